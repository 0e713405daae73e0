"""Evaluate a student against its teacher: images from the same noise, size, cost per image and speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .analysis import Table
from .teacher import MAX_SEQUENCE_LENGTH


def find_student(output_dir: str | Path, student_path: str | Path | None = None) -> Path:
    """`student_path`, or the student notebook 03 wrote under `output_dir/distill` (EMA weights first)."""
    candidates = [Path(student_path)] if student_path else [Path(output_dir) / "distill" / name
                                                            for name in ("student_ema", "student")]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"no trained student at {' or '.join(map(str, candidates))}: run 03_distill.ipynb "
                            "first (same output_dir) or pass student_path")


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, latent_hw: tuple[int, int], device: str | torch.device = "cpu") -> int:
    """FLOPs of one forward on one image (batch 1, 512 text tokens); a 3D Wan teacher gets a single frame."""
    config = model.config
    h, w = latent_hw
    frame = (1,) if len(config.patch_size) == 3 else ()
    with torch.device(device):  # on meta, Wan's RoPE tables must be made on meta too
        latents = torch.randn(1, config.in_channels, *frame, h, w)
        text = torch.randn(1, MAX_SEQUENCE_LENGTH, config.text_dim)
        timestep = torch.full((1,), 500.0)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(latents, timestep, text, return_dict=False)
    return counter.get_total_flops()


def images_per_second(sample, batch_size: int, repeats: int = 3) -> float:
    """Median throughput of `sample()` (one warm-up call first)."""
    sample()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample()
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def _noise(teacher, batch_size: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(teacher.latent_shape(batch_size, height, width), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_and_student_images(teacher, student_pipe, prompts: list[str], *, height: int, width: int,
                               num_inference_steps: int, seed: int = 0) -> dict:
    """{"teacher": [...], "student": [...]} PIL images for `prompts`, both from the same initial noise."""
    noise = _noise(teacher, len(prompts), height, width, seed)
    teacher.experts  # noqa: B018 - WanPipeline switches experts mid-sampling: both must be resident
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    teacher_images = teacher.pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, height=height, width=width, num_frames=1,
        num_inference_steps=num_inference_steps, guidance_scale=teacher.guidance_scale,
        guidance_scale_2=teacher.guidance_scale_2, output_type="pil").frames
    student_images = student_pipe(prompt_embeds=embeds, latents=noise[:, :, 0],
                                  num_inference_steps=num_inference_steps, output_type="pil").images
    return {"teacher": [clip[0] for clip in teacher_images], "student": student_images}


def compare_speed_and_size(teacher, student_pipe, *, height: int, width: int, num_inference_steps: int,
                           repeats: int = 3) -> Table:
    """Parameters, forward FLOPs, forwards and FLOPs per image, and measured images/s (teacher vs student).

    The teacher's parameters are one expert's (one is active per step); its images use CFG (two forwards per
    step), the student's one forward per step. Both generate from prompt embeddings to latents, so the shared
    text encoder and VAE do not blur the comparison.
    """
    noise = _noise(teacher, 1, height, width, seed=0)
    latent_hw = tuple(noise.shape[-2:])
    embeds, negative = teacher.encode_prompts(["a red fox sitting in fresh snow"], negative="")
    expert = teacher.experts["transformer"]  # WanPipeline switches experts mid-sampling: all must be resident
    student = student_pipe.transformer
    teacher.pipe.set_progress_bar_config(disable=True)
    student_pipe.set_progress_bar_config(disable=True)

    def teacher_sample():
        teacher.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, height=height, width=width,
                     num_frames=1, num_inference_steps=num_inference_steps, guidance_scale=teacher.guidance_scale,
                     guidance_scale_2=teacher.guidance_scale_2, output_type="latent")

    def student_sample():
        student_pipe(prompt_embeds=embeds, latents=noise[:, :, 0], num_inference_steps=num_inference_steps,
                     output_type="latent")

    rows = []
    for name, model, forwards, sample in (("teacher", expert, 2 * num_inference_steps, teacher_sample),
                                          ("student", student, num_inference_steps, student_sample)):
        flops = forward_flops(model, latent_hw, device=next(model.parameters()).device)
        rows.append((name, num_params(model), flops, forwards, flops * forwards,
                     images_per_second(sample, 1, repeats)))
    (_, tp, tf, _, ti, ts), (_, sp, sf, _, si, ss) = rows
    rows.append(("student gain", f"{tp / sp:.1f}x", f"{tf / sf:.1f}x", "", f"{ti / si:.1f}x", f"{ss / ts:.2f}x"))
    return Table(("model", "params", "forward FLOPs", "forwards/image", "FLOPs/image", "images/s"), rows,
                 f"{height}x{width}, {num_inference_steps} steps; teacher = one expert, with CFG; "
                 "student gain = teacher/student for size and FLOPs, student/teacher for images/s")
