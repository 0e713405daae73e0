"""Does a projected start still pay after training? Steps each projection needs to reach random init's final loss.

One student config, four starts: the teacher's weights projected by `importance`, `truncate` and `svd`, and a
random initialisation. Each is trained by `distill()` from the same target cache with the same seed (the same
batches in the same order), learning rate and step budget (`short_runs.py`). The table gives per start:
the held-out error before training (relative velocity MSE on the teacher's sampling trajectories for held-out
prompts), the training loss at the end, the held-out error after training, and the first step at which its loss
curve reaches random init's final loss. Loss curves are trailing means over `--smooth` steps (fewer at the
start); "final loss" is that mean at the last step.

Run: `python benchmarks/projection_steps.py [--teacher toy|tiny|DIR] [--steps 150] [--smooth 10]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from short_runs import ShortRuns, add_arguments, default_student_config, steps_to_reach

from wandistiller.analysis import INIT_METHODS
from wandistiller.model import load_student_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, steps=150)
    parser.add_argument("--student-config", type=Path, help="default: the teacher's small student config")
    args = parser.parse_args(argv)
    config = load_student_config(args.student_config or default_student_config(args.teacher)).to_dict()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs = ShortRuns(args, Path(tmp))
        results = {method: runs.train(method, config, method) for method in INIT_METHODS}
    curves = {method: run.smoothed(args.smooth) for method, run in results.items()}
    reference = curves["random"][-1]
    print(f"Student {config['depth']} blocks x {config['num_heads']} heads ({config['hidden_size']} wide, ffn "
          f"{config['ffn_dim']}); {runs.description}; loss = trailing mean over {args.smooth} steps.\n")
    print("| start | held-out error before | final loss | held-out error after | steps to random's final loss |")
    print("| --- | --- | --- | --- | --- |")
    for method, run in results.items():
        reached = steps_to_reach(curves[method], reference)
        steps = f"{reached} ({reached / args.steps:.0%} of the budget)" if reached else f"not within {args.steps}"
        steps = "(the reference)" if method == "random" else steps
        print(f"| {method} | {run.initial_error:.4f} | {curves[method][-1]:.4g} | {run.final_error:.4f} | {steps} |")
    fastest = min((m for m in INIT_METHODS if m != "random"),
                  key=lambda m: steps_to_reach(curves[m], reference) or args.steps + 1)
    reached = steps_to_reach(curves[fastest], reference)
    print(f"\n{fastest} reaches random init's final loss ({reference:.4g}) "
          + (f"in {reached} of {args.steps} steps ({args.steps / reached:.1f}x fewer)." if reached else "not at all.")
          + f" Held-out error is relative MSE (1 = predicting zero); {time.perf_counter() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
