"""Short `distill()` runs that compare students by training them (used by projection_init_error and student_shape).

Every student of a comparison gets the same teacher, training prompts, target cache (built once), seed (so the
same batches in the same order), optimiser settings and step budget; only its initial weights or its shape differ.
Each is measured on held-out prompts before and after training (`analysis.held_out_error`: relative velocity MSE
on the teacher's own sampling trajectories), and its per-step training loss is kept from `distill()`'s metrics.

Teacher: the committed toy-world teacher ("toy") when data/toy_world exists, else the embedded random "tiny" one.
Held-out prompts: the toy world's held-out combinations when every training prompt is a toy-world caption, else
the last `HELD_OUT` prompts of the prompt file (the others are trained on).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from wandistiller import WanLiteTransformer2DModel, distill, load_teacher, shapes
from wandistiller.analysis import held_out_error, held_out_set
from wandistiller.data import read_prompts
from wandistiller.model import load_student_config
from wandistiller.projection import project
from wandistiller.toy_world import toy_world_path

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 8


def default_teacher() -> str:
    try:
        toy_world_path()
        return "toy"
    except FileNotFoundError:
        return "tiny"


def _is_tiny(teacher: str) -> bool:
    return teacher.startswith("tiny")


def default_data_path(teacher: str) -> Path:
    """The prompts the teacher's tokenizer was made for: the packaged prompts (tiny) or the toy-world captions."""
    return ROOT / "data" / ("static_prompts.txt" if _is_tiny(teacher) else "toy_prompts.txt")


def default_student_config(teacher: str) -> Path:
    return ROOT / "config" / ("student_config_small.json" if _is_tiny(teacher) else "student_config_toy.json")


def add_arguments(parser, steps: int) -> None:
    """The options every short-run benchmark shares."""
    parser.add_argument("--teacher", default=default_teacher(),
                        help="toy (when data/toy_world exists), tiny, or a Wan Diffusers folder such as outputs/toy_world3")
    parser.add_argument("--data-path", type=Path, help="training prompts (default: the teacher's, see short_runs.py)")
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps per student (the same for all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--num-inference-steps", type=int, default=8, help="teacher sampler steps per trajectory")
    parser.add_argument("--smooth", type=int, default=20, help="steps in the trailing mean of the loss curve")
    parser.add_argument("--seed", type=int, default=0)


def trailing_mean(values: list[float], window: int) -> list[float]:
    """values[i] averaged with the up to `window - 1` values before it (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def steps_to_reach(curve: list[float], level: float) -> int | None:
    """The first step (counted from 1) at which `curve` is at or below `level`; None when it never is."""
    return next((i + 1 for i, value in enumerate(curve) if value <= level), None)


@dataclass
class Run:
    """One student's short run: held-out error before and after, its per-step training loss."""

    initial_error: float
    final_error: float
    losses: list[float]

    def smoothed(self, window: int) -> list[float]:
        return trailing_mean(self.losses, window)


class ShortRuns:
    """The shared setup of a comparison (teacher, prompts, target cache, held-out set); `train` runs one student."""

    def __init__(self, args, workdir: Path):
        self.args, self.workdir = args, workdir
        self.teacher = load_teacher(args.teacher, device_strategy="cpu")
        prompts = read_prompts(args.data_path or default_data_path(args.teacher))
        if all(shapes.is_caption(p) for p in prompts):
            held_out = [p for p in shapes.held_out_prompts() if p not in prompts]
        else:
            prompts, held_out = prompts[:-HELD_OUT], prompts[-HELD_OUT:]
        self.prompts = prompts
        self.data_path = workdir / "prompts.txt"
        self.data_path.write_text("\n".join(prompts) + "\n")
        self.teacher_config = self.teacher.transformer_config()
        self.image_size = load_student_config(default_student_config(args.teacher)).image_size
        self.held_out = held_out_set(self.teacher, held_out, height=self.image_size, width=self.image_size,
                                     num_inference_steps=args.num_inference_steps)
        self.description = (f"teacher {args.teacher} ({self.teacher_config['num_layers']} blocks x "
                            f"{self.teacher_config['num_attention_heads']} heads of {self.teacher_config['attention_head_dim']}), "
                            f"{len(prompts)} training prompts x {args.num_inference_steps} trajectory steps, "
                            f"{len(held_out)} held-out prompts; {args.steps} steps of batch {args.batch_size}, "
                            f"lr {args.lr:g}, seed {args.seed}, {self.image_size}x{self.image_size}")

    def initial_student(self, student_config, init: str) -> WanLiteTransformer2DModel:
        """`init` = "random" or a projection width method, as `distill()` would build it (calibrated on the first 8
        training prompts, uniform depth, low-noise expert)."""
        if init == "random":
            return WanLiteTransformer2DModel.from_student_config(student_config, self.teacher_config, seed=self.args.seed)
        return project(self.teacher, student_config, width=init, calibration={"prompts": self.prompts[:8]})[0]

    def train(self, name: str, student_config: dict, init: str) -> Run:
        """Train a student (config dict) from `init` for the step budget; its held-out error before and after."""
        start = self.workdir / f"{name}_init"
        student = self.initial_student(student_config, init).eval()
        initial_error = held_out_error(student, self.held_out)
        student.save_pretrained(start)
        a = self.args
        result = distill(teacher_path=a.teacher, student_config=student_config, student_init=str(start),
                         data_path=str(self.data_path), output_dir=str(self.workdir / name),
                         cache_dir=str(self.workdir / "cache"), num_inference_steps=a.num_inference_steps,
                         height=self.image_size, width=self.image_size, batch_size=a.batch_size, max_steps=a.steps,
                         num_epochs=10_000, lr=a.lr, warmup_steps=10, ema_decay=0.0, seed=a.seed,
                         checkpoint_interval=10**9, keep_checkpoints=1, save_samples=False, progress=False,
                         overwrite=True)
        final_error = held_out_error(WanLiteTransformer2DModel.from_pretrained(result.student_path), self.held_out)
        return Run(initial_error, final_error, [m["loss"] for m in result.metrics])
