"""What a few-step student saves per image, and what it keeps.

1. FLOPs per image at full size, counted on the meta device (no memory, no time): the Wan 2.2 A14B teacher at
   40 steps with CFG (two expert forwards a step) against the default student (config/student_config.json),
   CFG-distilled (one forward a step), at 40, 8 and 4 steps, each with one decode of the Wan 2.1 VAE
   (diffusers' `AutoencoderKLWan()` defaults, the VAE of A14B) in its exact 2D form.
2. Alignment against steps on the toy world, when a few-step pipeline is given (`make demo` writes one to
   outputs/demo/fewstep/pipeline): the teacher at 30 steps with guidance 5 and the student at 1, 2, 4 and 8
   steps with its pipeline's defaults, all from the same noise, on the 24 held-out prompts.

Run: `python benchmarks/few_step_cost.py [--size 1024] [--pipeline outputs/demo/fewstep/pipeline]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from wandistiller.analysis import meta_expert
from wandistiller.evaluate import forward_flops, vae_flops
from wandistiller.projection import project
from wandistiller.vae2d import vae_to_2d

ROOT = Path(__file__).resolve().parent.parent
TEACHER_STEPS = 40


def flops_table(size: int) -> None:
    teacher = meta_expert("a14b")
    student, _ = project(teacher, ROOT / "config" / "student_config.json")
    latent_hw = (size // 8, size // 8)
    per_forward = {"teacher": forward_flops(teacher, latent_hw, device="meta"),
                   "student": forward_flops(student, latent_hw, device="meta")}
    with torch.device("meta"):
        vae = vae_to_2d(AutoencoderKLWan())
    decode = vae_flops(vae, size, size)[1]
    rows = [("A14B teacher, CFG", TEACHER_STEPS, 2 * TEACHER_STEPS, 2 * TEACHER_STEPS * per_forward["teacher"] + decode)]
    rows += [("student, CFG-distilled", steps, steps, steps * per_forward["student"] + decode)
             for steps in (TEACHER_STEPS, 8, 4)]
    print(f"FLOPs per {size}x{size} image, meta device: transformer forwards + one VAE decode "
          f"({decode / 1e12:.2f} TFLOP, 2D form of the Wan 2.1 VAE)\n")
    print("| sampler | steps | forwards | TFLOP per image | teacher / this |")
    print("| --- | --- | --- | --- | --- |")
    for name, steps, forwards, flops in rows:
        print(f"| {name} | {steps} | {forwards} | {flops / 1e12:,.1f} | {rows[0][3] / flops:,.1f}x |")


def alignment_rows(pipeline: Path) -> None:
    from wandistiller import load_teacher
    from wandistiller.evaluate import alignment_table, load_student_pipeline, step_count_images
    from wandistiller.shapes import IMAGE_SIZE, held_out_prompts

    teacher = load_teacher("toy", guidance_scale=5.0)
    pipe = load_student_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts()
    rows = step_count_images(teacher, pipe, prompts, step_counts=(1, 2, 4, 8), teacher_steps=30,
                             height=IMAGE_SIZE, width=IMAGE_SIZE, seed=0)
    table = alignment_table(rows, prompts)
    print(f"\nToy-world alignment against steps, {pipeline} (same noise, seed 0):\n")
    print("| " + " | ".join(table.columns) + " |")
    print("|" + " --- |" * len(table.columns))
    for row in table.rows:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--pipeline", type=Path, default=ROOT / "outputs" / "demo" / "fewstep" / "pipeline")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    flops_table(args.size)
    if (args.pipeline / "model_index.json").is_file():
        alignment_rows(args.pipeline)
    else:
        print(f"\nno few-step pipeline at {args.pipeline}: run `make demo` first for the alignment rows")


if __name__ == "__main__":
    main()
