"""Iso-FLOP sweep: for the same FLOPs per forward, which student shape, wide-shallow to narrow-deep, learns best?

Every shape is projected from the same teacher with `width="importance"` (whole teacher heads, so the width is
a number of heads times the teacher's head dim; depth at most the teacher's) and trained by `distill()` with the
same prompts, target cache, seed and step budget (`short_runs.py`). The FLOPs target is `--flop-fraction` of one
teacher expert forward. For each head count the sweep takes the depth at which some `ffn_dim` (a multiple of 8,
at most the teacher's) brings the forward within `--tolerance` of the target, preferring the FFN/width ratio
closest to the teacher's (`iso_flop_shapes`); the chosen shapes' FLOPs are measured exactly. FLOPs: `evaluate.forward_flops` on the meta device (batch 1, 512 text rows as
WanPipeline pads them; attention included). A student skips the zero padding of a real prompt, so the table
also gives the FLOPs at the held-out prompts' true length. The result: the held-out error (relative velocity
MSE on the teacher's sampling trajectories for held-out prompts) after the budget. Last, the full-size line the
default student (`config/student_config.json`) was chosen from: A14B shapes at its FLOPs per 1024² forward.

Run: `python benchmarks/student_shape.py [--teacher toy|tiny|DIR] [--steps 150] [--flop-fraction 0.33]`.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from short_runs import ROOT, ShortRuns, add_arguments

from wandistiller.analysis import FULL_SIZE_EXPERTS
from wandistiller.evaluate import forward_flops, num_params
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.text_padding import text_lengths

FFN_STEP = 8


def shape_config(teacher_config: dict, heads: int, depth: int, ffn_dim: int, image_size: int = 64) -> dict:
    return {"hidden_size": heads * teacher_config["attention_head_dim"], "depth": depth, "num_heads": heads,
            "ffn_dim": ffn_dim, "image_size": image_size}


def meta_flops(config: dict, teacher_config: dict, latent_hw: tuple[int, int], text_rows: int | None = None) -> int:
    """FLOPs of one forward of the student `config` (meta device); `text_rows` rows of text instead of 512."""
    with torch.device("meta"):
        student = WanLiteTransformer2DModel.from_student_config(config, teacher_config)
    text = None if text_rows is None else torch.zeros(1, text_rows, teacher_config["text_dim"])
    return forward_flops(student, latent_hw, device="meta", text=text)


def iso_flop_shapes(teacher_config: dict, target: float, latent_hw, tolerance: float, heads_range=None,
                    ffn_ratio: float | None = None) -> list[tuple[int, int, int, int]]:
    """(heads, depth, ffn_dim, FLOPs) per head count (`heads_range`, default all) that can meet `target`, widest
    first; of a head count's depths, the one whose FFN/width ratio is closest to `ffn_ratio` (default the teacher's).

    A forward's FLOPs are a + depth * (b + c * ffn_dim) (identical blocks, FFN FLOPs linear in its width): three
    measured forwards per head count give a, b and c, from which each depth's ffn_dim is solved; the chosen
    shapes' FLOPs are then measured exactly.
    """
    head_dim, heads_t = teacher_config["attention_head_dim"], teacher_config["num_attention_heads"]
    ratio = ffn_ratio or teacher_config["ffn_dim"] / (heads_t * head_dim)
    lo, hi = FFN_STEP, teacher_config["ffn_dim"] // FFN_STEP * FFN_STEP
    shapes = []
    for heads in heads_range or range(heads_t, 0, -1):
        flops = lambda depth, ffn: meta_flops(shape_config(teacher_config, heads, depth, ffn), teacher_config, latent_hw)
        one_lo, one_hi, two_lo = flops(1, lo), flops(1, hi), flops(2, lo)
        c = (one_hi - one_lo) / (hi - lo)
        b = two_lo - one_lo - c * lo
        a = one_lo - b - c * lo
        candidates = []
        for depth in range(1, teacher_config["num_layers"] + 1):
            ffn = min(hi, max(lo, round(((target - a) / depth - b) / c / FFN_STEP) * FFN_STEP))
            if abs((a + depth * (b + c * ffn)) / target - 1) <= tolerance:
                candidates.append((depth, ffn))
        if candidates:  # the FFN/width ratio closest to the teacher's
            depth, ffn = min(candidates, key=lambda d_f: abs(math.log(d_f[1] / (heads * head_dim) / ratio)))
            shapes.append((heads, depth, ffn, flops(depth, ffn)))
    return shapes


def full_size_line(default: dict, a14b: dict, tolerance: float, size: int = 1024) -> None:
    """The shapes of whole A14B heads that cost what the default student does per forward (meta device), FFN/width
    as the default's: the line a full-size sweep would choose from."""
    latent_hw = (size // 8, size // 8)
    default_config = shape_config(a14b, default["num_heads"], default["depth"], default["ffn_dim"], size)
    target = meta_flops(default_config, a14b, latent_hw)
    shapes = iso_flop_shapes(a14b, target, latent_hw, tolerance, heads_range=(24, 20, 16, 14, 12, 10, 8),
                             ffn_ratio=default["ffn_dim"] / default["hidden_size"])
    print(f"\nFull size: shapes of whole A14B heads at the default student's {target / 1e12:.2f} TFLOP per {size}x{size} "
          f"forward (FFN/width as the default's {default['ffn_dim'] / default['hidden_size']:.2f}):\n")
    print("| blocks x width | heads | ffn | depth / A14B | width / A14B | FLOPs / default |\n| --- | --- | --- | --- | --- | --- |")
    width = a14b["num_attention_heads"] * a14b["attention_head_dim"]
    for heads, depth, ffn, flops in shapes:
        hidden = heads * a14b["attention_head_dim"]
        print(f"| {depth} x {hidden} | {heads} | {ffn} | {depth / a14b['num_layers']:.2f} | {hidden / width:.2f} "
              f"| {flops / target:.3f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, steps=150)
    parser.add_argument("--flop-fraction", type=float, default=1 / 3, help="FLOPs target / one teacher forward")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest |FLOPs / target - 1| of a shape")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = ShortRuns(args, Path(tmp))
        tc, size = runs.teacher_config, runs.image_size
        latent_hw = tuple(runs.teacher.latent_shape(1, size, size)[-2:])
        teacher_width = tc["num_attention_heads"] * tc["attention_head_dim"]
        full = shape_config(tc, tc["num_attention_heads"], tc["num_layers"], tc["ffn_dim"], size)
        teacher_flops = meta_flops(full, tc, latent_hw)  # a full-size student costs what a teacher expert does
        target = args.flop_fraction * teacher_flops
        shapes = iso_flop_shapes(tc, target, latent_hw, args.tolerance)
        if not shapes:
            raise SystemExit(f"no shape of whole teacher heads comes within {args.tolerance:.0%} of {target:.4g} FLOPs: "
                             "choose another --flop-fraction or a larger --tolerance")
        prompt_rows = round(text_lengths(runs.held_out.prompt_embeds).float().mean().item()) + 1
        results = []
        for heads, depth, ffn, flops in shapes:
            config = shape_config(tc, heads, depth, ffn, size)
            run = runs.train(f"{heads}x{depth}", config, "importance")
            with torch.device("meta"):
                params = num_params(WanLiteTransformer2DModel.from_student_config(config, tc))
            results.append((config, flops, meta_flops(config, tc, latent_hw, prompt_rows), params, run))
    print(f"Target: {args.flop_fraction:.3g} x one teacher forward = {target / 1e6:.1f} MFLOP (teacher "
          f"{teacher_flops / 1e6:.1f} MFLOP at {size}x{size}, {tc['num_layers']} blocks x {teacher_width} wide, ffn "
          f"{tc['ffn_dim']}); {runs.description}; loss = trailing mean over {args.smooth} steps. \"Real prompt\": "
          f"{prompt_rows - 1} text tokens + one row for the padding, what the student's cross-attention attends to.\n")
    print("| shape (blocks x heads) | depth / teacher | width / teacher | ffn | params | MFLOP / forward | vs target "
          "| MFLOP, real prompt | held-out error before | final loss | held-out error after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for config, flops, prompt_flops, params, run in results:
        print(f"| {config['depth']} x {config['num_heads']} ({config['hidden_size']} wide) "
              f"| {config['depth'] / tc['num_layers']:.2f} | {config['hidden_size'] / teacher_width:.2f} "
              f"| {config['ffn_dim']} | {params:,} | {flops / 1e6:.2f} | {flops / target:.4f} | {prompt_flops / 1e6:.2f} "
              f"| {run.initial_error:.4f} | {run.smoothed(args.smooth)[-1]:.4g} | {run.final_error:.4f} |")
    if len(results) < 3:
        print(f"\nOnly {len(results)} shape(s) of whole teacher heads come within {args.tolerance:.0%} of the target "
              "for this teacher: the sweep needs a teacher with more heads and blocks (the toy world's).")
    best, *_ = min(results, key=lambda r: r[-1].final_error)
    default = json.loads((ROOT / "config" / "student_config.json").read_text())
    a14b = FULL_SIZE_EXPERTS["a14b"]
    a14b_width = a14b["num_attention_heads"] * a14b["attention_head_dim"]
    full_size_line(default, a14b, args.tolerance)
    print(f"\nBest after {args.steps} steps: depth {best['depth']} x width {best['hidden_size']} (ffn {best['ffn_dim']}), "
          f"depth {best['depth'] / tc['num_layers']:.2f}x and width {best['hidden_size'] / teacher_width:.2f}x the "
          f"teacher's; the default full-size student ({default['depth']} x {default['hidden_size']} of A14B's "
          f"{a14b['num_layers']} x {a14b_width}) is depth {default['depth'] / a14b['num_layers']:.2f}x, width "
          f"{default['hidden_size'] / a14b_width:.2f}x. {time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
