"""What `distill()` costs over a bare training loop: one optimiser step of the kit vs a hand-written torch loop.

The kit's step (from the target cache: batch assembly, student forward, loss, backward, gradient clipping,
AdamW, EMA, the metrics line) is timed by a `Callback` between consecutive `on_step` calls. The bare loop is
what one would write by hand for the same work: the same student architecture and weights, the same batch
shapes (latents, timesteps, the 512-row prompt embeddings) and the same guided target, MSE, backward, AdamW.
Both run in this process, alternately, and the medians are compared; the ratio is the kit's overhead.

Run: `python benchmarks/kit_overhead.py [--steps 30] [--rounds 2] [--batch-size 8]`. Shared, noisy machine:
compare the ratio of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wandistiller import Callback, WanLiteTransformer2DModel, distill, load_teacher
from wandistiller.data import read_prompts
from wandistiller.flow import guided_velocity

ROOT = Path(__file__).resolve().parent.parent


class StepTimer(Callback):
    """Wall time between consecutive optimiser steps (the first step, which includes warm-up, is dropped)."""

    def __init__(self):
        self.times = []

    def on_step(self, step: int, metrics: dict) -> None:
        self.times.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def kit_steps(workdir: Path, args, cache_dir: Path) -> tuple[list[float], Path]:
    timer = StepTimer()
    result = distill(teacher_path=args.teacher, student_config=args.student_config, data_path=args.data_path,
                     output_dir=str(workdir), cache_dir=str(cache_dir), batch_size=args.batch_size,
                     height=args.image_size, width=args.image_size,
                     max_steps=args.steps, num_epochs=10_000, lr=1e-4, checkpoint_interval=10**9, save_samples=False,
                     progress=False, overwrite=True, callbacks=[timer])
    return timer.step_seconds(), Path(result.student_path)


def bare_steps(student_path: Path, teacher, prompts: list[str], args, extras: bool) -> list[float]:
    """The hand-written loop: forward, guided target, MSE, backward, AdamW; with `extras` also gradient
    clipping and an EMA update (torch's foreach ops), the two numerical extras of the kit's step."""
    model = WanLiteTransformer2DModel.from_pretrained(student_path).train()
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    embeds, _ = teacher.encode_prompts(prompts[: args.batch_size], negative="")
    g = torch.Generator().manual_seed(0)
    latent = args.image_size // teacher.vae_scale_factor
    shape = (args.batch_size, model.config.in_channels, latent, latent)
    times = []
    for _ in range(args.steps):
        x = torch.randn(shape, generator=g)
        t = torch.rand(args.batch_size, generator=g) * 1000
        v_cond, v_uncond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        target = guided_velocity(v_cond, v_uncond, 5.0)
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, embeds).sample.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if extras:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if extras:
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - 0.999)
        times.append(time.perf_counter() - start)
    return times[1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="tiny")
    parser.add_argument("--student-config", default=str(ROOT / "config" / "student_config_small.json"))
    parser.add_argument("--data-path", default=str(ROOT / "data" / "static_prompts.txt"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    args.image_size = json.loads(Path(args.student_config).read_text()).get("image_size", 64)
    teacher = load_teacher(args.teacher, device_strategy="cpu")
    prompts = read_prompts(args.data_path)
    kit, bare, extra = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for round_ in range(args.rounds):
            seconds, student = kit_steps(Path(tmp) / f"run{round_}", args, cache)
            kit += seconds
            bare += bare_steps(student, teacher, prompts, args, extras=False)
            extra += bare_steps(student, teacher, prompts, args, extras=True)
    k, b, e = statistics.median(kit), statistics.median(bare), statistics.median(extra)
    rows = [("bare torch loop: forward, backward, AdamW", b, bare),
            ("bare loop + gradient clipping + EMA", e, extra), ("`distill()` from the cache", k, kit)]
    print("| loop | median step | vs bare | steps timed |\n| --- | --- | --- | --- |")
    for name, median, times in rows:
        print(f"| {name} | {median * 1e3:.1f} ms | {median / b:.3f}x | {len(times)} |")
    print(f"\nkit overhead: {k / b:.3f}x the bare loop, {k / e:.3f}x the bare loop with the same clipping and EMA "
          f"(goal <= 1.05x); batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
