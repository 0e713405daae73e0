"""The `wandistiller` command: build the tiny teacher, run the demo, run notebooks, distil."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_tiny_teacher(args) -> int:
    from .toy import make_tiny_wan

    path = make_tiny_wan(args.path, args.variant, args.seed, overwrite=args.overwrite)
    print(f"tiny Wan {args.variant} teacher written to {path}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.output_dir), teacher_path=args.teacher_path)
    return 0


def _distill(args) -> int:
    from .loops import distill

    params = {k: v for k, v in vars(args).items() if k not in ("command", "func") and v is not None}
    result = distill(**params)
    if result.student_path is not None:
        print(f"student saved to {result.student_path} ({result.steps} steps; metrics in {result.metrics_path})")
    return 0


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig field, named as in the notebooks and the original tool (--num_epochs ...)."""
    import dataclasses

    from .loops import DistillConfig

    for f in dataclasses.fields(DistillConfig):
        if f.name == "callbacks":
            continue
        kind = str(f.type)
        flag = f"--{f.name}"
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {f.default})")
        elif kind.startswith("list"):
            parser.add_argument(flag, nargs="+", default=None, help="one or more values")
        else:
            convert = float if kind.startswith("float") else int if kind.startswith("int") else str
            parser.add_argument(flag, type=convert, default=None, metavar=f.name.upper(),
                                help=f"(default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from .toy import VARIANTS

    parser = argparse.ArgumentParser(
        prog="wandistiller",
        description="Distil the Wan 2.2 text-to-video model into Wan-Lite, a small 2D text-to-image model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny-teacher", help="write the embedded tiny Wan teacher as a diffusers pipeline directory",
                       description="Write a tiny, structurally faithful Wan 2.x diffusers pipeline directory, built offline.")
    p.add_argument("path", help="directory to create (must not exist or be empty)")
    p.add_argument("--variant", choices=VARIANTS, default="a14b",
                   help="a14b: two experts switched by timestep; ti2v-5b: 48-channel latents; 2.1: one transformer")
    p.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.set_defaults(func=_make_tiny_teacher)

    p = sub.add_parser("demo", help="run the kit end to end on the embedded tiny teacher")
    p.add_argument("--output-dir", default="outputs/demo", help="where results go (default: outputs/demo)")
    p.add_argument("--teacher-path", default="tiny", help="teacher directory or hub id (default: the tiny teacher)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("distill", help="distil a teacher into a Wan-Lite student (works under torchrun)",
                       description="Distil a Wan teacher into a Wan-Lite student. Under `torchrun --nproc_per_node=N "
                                   "-m wandistiller distill ... --distributed` every rank runs this command.")
    _add_distill_arguments(p)
    p.set_defaults(func=_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"wandistiller: error: {err}", file=sys.stderr)
        return 2
