"""The distillation recipe, measured on the toy world: which choices make a student draw what the teacher draws.

Every student gets the same optimiser steps from the same toy-world teacher (`data/toy_world`, guidance 5) and
is scored on the 24 held-out prompts (combinations the teacher never saw), from the same noise as the teacher,
with the toy-world scorer. Each student is sampled by the pipeline its run exported, as a user would: one
forward a step when CFG-distilled, the teacher's guidance otherwise.

| variant | what changes from the default |
| --- | --- |
| default | trajectory targets + projection init + CFG distillation |
| noise | `latent_source="noise"`: pure-noise inputs at random t (what the original tool did) |
| random init | `student_init="random"` |
| no CFG distillation | conditional targets; the student is sampled with the teacher's CFG (two forwards a step) |
| feature KD | `feature_weight=1.0`, block outputs matched through the projection's channel map (online teacher) |
| renoise | `latent_source="renoise"`: the teacher's finished pictures re-noised at random t |

Run: `python benchmarks/toy_recipe.py [--steps 400] [--variants default,noise,...]`; about 5 minutes a
variant on 2 CPU cores (feature KD, which queries the teacher every step, more). Not part of `make bench`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from wandistiller import distill, load_teacher
from wandistiller.evaluate import alignment_table, load_student_pipeline, teacher_and_student_images
from wandistiller.shapes import IMAGE_SIZE, held_out_prompts

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "default": {},
    "noise": {"latent_source": "noise"},
    "random init": {"student_init": "random"},
    "no CFG distillation": {"cfg_distill": False},
    "feature KD": {"feature_weight": 1.0, "teacher_targets": "online"},
    "renoise": {"latent_source": "renoise"},
}
SETTINGS = dict(teacher_path="toy", guidance_scale=5.0, student_config=str(ROOT / "config" / "student_config_toy.json"),
                data_path=str(ROOT / "data" / "toy_prompts.txt"), num_inference_steps=20, samples_per_prompt=20,
                batch_size=16, lr=1e-3, warmup_steps=20, save_samples=False, progress=False, num_epochs=10_000)


def run_variant(name: str, output_dir: Path, steps: int, seed: int) -> tuple[Path, float]:
    """Train one student; variants with the same targets share one cache (recorded once)."""
    change = VARIANTS[name]
    targets = f"cache_{change.get('latent_source', 'trajectory')}_{'cfg' if change.get('cfg_distill', True) else 'cond'}"
    started = time.time()
    distill(**{**SETTINGS, **change}, output_dir=str(output_dir / name.replace(" ", "_")), max_steps=steps, seed=seed,
            cache_dir=str(output_dir / targets), overwrite=True)
    return output_dir / name.replace(" ", "_"), time.time() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps per student")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "bench_toy_recipe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    teacher = load_teacher("toy", guidance_scale=SETTINGS["guidance_scale"])
    prompts = held_out_prompts()
    rows, seconds = {}, {}
    for name in names:
        run_dir, seconds[name] = run_variant(name, args.output_dir, args.steps, args.seed)
        pipe = load_student_pipeline(run_dir)
        pipe.set_progress_bar_config(disable=True)
        images = teacher_and_student_images(teacher, pipe, prompts, height=IMAGE_SIZE, width=IMAGE_SIZE,
                                            num_inference_steps=args.sample_steps, seed=args.seed)
        rows.setdefault("teacher (CFG, 2 forwards a step)", images["teacher"])
        rows[name] = images["student"]
        print(f"{name}: trained in {seconds[name]:.0f} s", flush=True)
    table = alignment_table(rows, prompts)
    teacher_rate = table.rows[0][-1]
    print(f"\nToy-world recipe: {len(prompts)} held-out prompts, {args.sample_steps} sampling steps, same noise; "
          f"{args.steps} optimiser steps of batch {SETTINGS['batch_size']} per student\n")
    print("| model | background | colour | shape | all-correct | vs teacher | train time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, *rates in table.rows:
        ratio = f"{rates[-1] / teacher_rate:.2f}x" if teacher_rate else "-"
        time_taken = f"{seconds[name]:.0f} s" if name in seconds else "-"
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in rates) + f" | {ratio} | {time_taken} |")


if __name__ == "__main__":
    main()
