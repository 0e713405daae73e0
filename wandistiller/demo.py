"""`make demo`: the kit end to end on the embedded tiny teacher."""

from __future__ import annotations

from pathlib import Path

import torch


def run_demo(output_dir: Path, teacher_path: str = "tiny") -> Path:
    """Generate one image with the teacher through WanPipeline and save it under `output_dir`."""
    from .teacher import load_teacher

    output_dir.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(teacher_path)
    prompt = "a red fox sitting in fresh snow, looking at the camera"
    generator = torch.Generator().manual_seed(0)
    image = teacher.pipe(prompt, height=64, width=64, num_frames=1, num_inference_steps=8,
                         guidance_scale=teacher.guidance_scale, guidance_scale_2=teacher.guidance_scale_2,
                         generator=generator, output_type="pil").frames[0][0]
    path = output_dir / "teacher_sample.png"
    image.save(path)
    print(f"teacher ({teacher.variant}, {teacher.source}) image for {prompt!r} saved to {path.resolve()}")
    return path
