"""`make bench`: every CPU benchmark in one run, their ratio tables collected in benchmarks/results.md.

Each script runs in its own process with settings small enough for a 2-core machine (the whole run takes
about 10-15 minutes there); the file records the machine, the date and the versions next to the figures, so a
ratio is only ever compared with ratios of the same run. `gpu_bench.py` is not run here (it needs a GPU).

Run: `python benchmarks/run_all.py [--only kit_overhead,vae2d] [--output benchmarks/results.md]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # script -> (arguments, what it answers)
    "kit_overhead": (["--steps", "25", "--rounds", "2"], "What does `distill()` add over a bare torch loop?"),
    "distill_memory_and_speed": ([], "What is resident while recording and training; cache vs online steps/s"),
    "cache_scale": ([], "Target cache: bytes per prompt, memory at 200 vs 3,000 prompts, streamed vs in-memory speed"),
    "sampling_speed": (["--repeats", "3"], "Student vs teacher: images/s here, parameters and FLOPs at full size"),
    "projection_init_error": (["--seeds", "4"], "Projection methods vs random init: error before training"),
    "projection_steps": (["--steps", "150"], "Projection methods vs random init: steps to reach random init's final loss"),
    "student_shape": (["--steps", "150"], "Iso-FLOP sweep: which student shape, wide-shallow to narrow-deep, learns best"),
    "vae2d": (["--repeats", "3"], "Wan's 3D VAE vs its exact 2D form"),
    "few_step_cost": ([], "Few-step student: FLOPs per image against the teacher, alignment against steps"),
    "toy_fidelity": (["--seeds", "8"], "Toy world: the demo's students vs the teacher over sampling seeds, with intervals"),
    "toy_world_shapes": (["--count", "32"], "Toy world: where the teacher loses its shapes (decoder, low-noise expert, sampler)"),
}
_NOISE = re.compile(r"(Loading|Writing|Fetching|it/s\]|s/it\]|\r)")


def machine() -> str:
    import diffusers
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.system()} {cpu}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}")


def run(name: str, args: list[str], timeout: int) -> tuple[str, float, int]:
    started = time.time()
    try:
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parent)
        out, code = done.stdout, done.returncode
        if code:
            out += "\n" + "\n".join(done.stderr.strip().splitlines()[-5:])
    except subprocess.TimeoutExpired:
        out, code = f"timed out after {timeout} s", 124
    lines = [line for line in out.splitlines() if not _NOISE.search(line)]
    return "\n".join(lines).strip(), time.time() - started, code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    parser.add_argument("--output", type=Path, default=HERE / "results.md")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}: choose from {', '.join(BENCHMARKS)}")
    sections, failed = [], []
    for name in names:
        script_args, question = BENCHMARKS[name]
        print(f"running {name} ...", flush=True)
        text, seconds, code = run(name, script_args, args.timeout)
        failed += [name] if code else []
        command = " ".join(["python", f"benchmarks/{name}.py", *script_args])
        sections.append(f"## {name}: {question}\n\n`{command}`, {seconds:.0f} s{'' if not code else f', exit {code}'}\n\n"
                        f"{text}\n")
    header = (f"# Benchmark results\n\nOne run of `make bench` ({machine()}). The machine may be shared: compare "
              "ratios within this file, not seconds across runs.\n")
    args.output.write_text("\n".join([header, *sections]))
    print(f"wrote {args.output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
