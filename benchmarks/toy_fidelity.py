"""How close the demo's students come to the toy-world teacher, over many sampling seeds.

24 held-out prompts make one seed's all-correct rate coarse (one prompt is 0.04, and a seed's rate moves by
about 0.1), so this scores the teacher and the students from the same noise over `--seeds` seeds and gives
each rate with its standard error, and each student's ratio to the teacher with a 90 % interval from a paired
bootstrap over the (seed, prompt) images. Models, all on the 24 held-out prompts of `data/toy_world`:

- the teacher: WanPipeline's sampler, 30 steps, guidance 5 (two expert forwards a step);
- the velocity student (`make demo` writes outputs/demo/distill/pipeline): 30 steps with its pipeline's defaults
  (the teacher's scheduler, guidance 1 when CFG-distilled: one forward a step);
- the few-step student (outputs/demo/fewstep/pipeline): 1, 2, 4 and 8 Euler steps with its defaults.

Run: `python benchmarks/toy_fidelity.py [--seeds 16] [--student DIR] [--few-step DIR]` (about 15 s a seed on
2 cores). A pipeline folder that is not there is skipped with a note.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import torch

from wandistiller.shapes import SHAPES

ROOT = Path(__file__).resolve().parent.parent
TEACHER_STEPS = 30
FEW_STEPS = (1, 2, 4, 8)


@torch.no_grad()
def sample_all(teacher, students: dict, prompts: list[str], seeds: int) -> dict[str, list]:
    """{row name: images over seeds x prompts}, every model from the teacher's noise of each seed (the teacher
    sampled once a seed, with the velocity student when there is one)."""
    from wandistiller.evaluate import initial_noise, teacher_and_student_images
    from wandistiller.shapes import IMAGE_SIZE

    images = collections.defaultdict(list)
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    velocity, few_step = students.get("velocity"), students.get("few_step")
    for seed in range(seeds):
        pair = teacher_and_student_images(teacher, velocity or few_step, prompts, height=IMAGE_SIZE,
                                          width=IMAGE_SIZE, num_inference_steps=TEACHER_STEPS, seed=seed)
        images["teacher"] += pair["teacher"]
        if velocity is not None:
            images[f"student, {TEACHER_STEPS} steps"] += pair["student"]
        if few_step is not None:
            noise = initial_noise(teacher, len(prompts), IMAGE_SIZE, IMAGE_SIZE, seed)  # the teacher's, as above
            for steps in FEW_STEPS:
                images[f"few-step student, {steps} step{'s' if steps > 1 else ''}"] += few_step(
                    prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise[:, :, 0],
                    num_inference_steps=steps, output_type="pil").images
        print(f"seed {seed} done", flush=True)
    return images


def ratio_interval(student: np.ndarray, teacher: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of mean(student) / mean(teacher) over paired bootstrap resamples of the images."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(teacher), size=(draws, len(teacher)))
    ratios = student[index].mean(1) / np.maximum(teacher[index].mean(1), 1e-9)
    return float(np.percentile(ratios, 5)), float(np.percentile(ratios, 95))


def fidelity_table(images: dict[str, list], prompts: list[str], seeds: int) -> list[str]:
    from wandistiller.alignment import alignment
    from wandistiller.shapes import parse_caption

    scored = {name: alignment(pictures, prompts * seeds) for name, pictures in images.items()}
    correct = {name: np.array([s["all"] for s in a.per_image], dtype=float) for name, a in scored.items()}
    shape_of = [parse_caption(p).shape for p in prompts * seeds]
    totals = collections.Counter(shape_of)
    teacher = correct["teacher"]
    lines = [f"All-correct on {len(prompts)} held-out prompts x {seeds} sampling seeds ({len(teacher)} images per "
             "model, the same noise for every model); ± is the standard error; the ratio's interval is 5-95 % of a "
             f"paired bootstrap over images. Counts per shape are out of {' / '.join(str(totals[s]) for s in SHAPES)}.\n",
             "| model | all-correct | per-seed range | vs teacher | 90 % interval | circle / square / triangle |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, hits in correct.items():
        per_seed = hits.reshape(seeds, len(prompts)).mean(1)
        se = hits.std(ddof=1) / np.sqrt(len(hits)) if len(hits) > 1 else 0.0
        by_shape = " / ".join(str(int(sum(h for h, s in zip(hits, shape_of) if s == shape))) for shape in SHAPES)
        low, high = ratio_interval(hits, teacher) if name != "teacher" else (1.0, 1.0)
        lines.append(f"| {name} | {hits.mean():.3f} ± {se:.3f} | {per_seed.min():.2f}-{per_seed.max():.2f} | "
                     f"{hits.mean() / max(teacher.mean(), 1e-9):.3f}x | {low:.2f}-{high:.2f}x | {by_shape} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="sampling seeds 0..N-1 (each 24 images per model)")
    parser.add_argument("--student", type=Path, default=ROOT / "outputs" / "demo" / "distill" / "pipeline")
    parser.add_argument("--few-step", type=Path, default=ROOT / "outputs" / "demo" / "fewstep" / "pipeline")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: pass at least 1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from wandistiller import load_teacher
    from wandistiller.evaluate import load_student_pipeline
    from wandistiller.shapes import held_out_prompts

    students = {}
    for key, folder in (("velocity", args.student), ("few_step", args.few_step)):
        if (folder / "model_index.json").is_file():
            students[key] = load_student_pipeline(folder)
            students[key].set_progress_bar_config(disable=True)
        else:
            print(f"no pipeline at {folder}: its rows are skipped (`make demo` writes it)")
    if not students:
        print("nothing to compare with the teacher: run `make demo` first, or pass --student / --few-step")
        return
    teacher = load_teacher("toy", guidance_scale=5.0)
    prompts = held_out_prompts()
    images = sample_all(teacher, students, prompts, args.seeds)
    print("\n" + "\n".join(fidelity_table(images, prompts, args.seeds)))


if __name__ == "__main__":
    main()
