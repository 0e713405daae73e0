"""`make demo`: the notebooks 01 -> 05 executed headless on the toy-world teacher, with a longer training run
than the notebooks' own defaults (those are sized for `make test`)."""

from __future__ import annotations

from pathlib import Path

from .data import packaged_file

NOTEBOOK_DIR = packaged_file("notebooks")
# What the demo changes in the notebooks' parameters: a student worth looking at, scored on every held-out prompt.
DEMO_PARAMETERS = {
    # 6 teacher trajectories per prompt (each from its own noise) at 10 epochs: 4,950 steps. At the same steps, more
    # trajectories beat more epochs (README, the toy world); at 6 trajectories, 6 epochs gave 0.83x the teacher
    # (16 seeds) and 12 epochs 0.98x, but 12 would take `make demo` past 10 minutes.
    "03_distill.ipynb": {"num_inference_steps": 20, "trajectories_per_prompt": 6, "num_epochs": 10, "batch_size": 16,
                         "lr": 1e-3, "checkpoint_interval": 500},
    "04_sample_and_evaluate.ipynb": {"num_prompts": 24},
    # reflow on 30 pairs per prompt that 03's student samples (30 steps each, ~50 s), 990 steps at the 4-step
    # sampler's noise levels with 40 % of rows at pure noise: 0.55 at 4 steps against 0.52 at sigma ~ U(0, 1) and
    # 0.45 on 03's 396 teacher pairs (seeds 0-7, README); 60 pairs per prompt cost 50 s more than the demo has
    "05_few_step.ipynb": {"num_epochs": 2, "num_prompts": 24, "reflow_pairs_per_prompt": 30},
}


def run_demo(output_dir: Path, teacher_path: str = "toy") -> list[Path]:
    """Run every numbered notebook in order, each writing into `output_dir`; print where the results are."""
    import papermill

    from .cli import run_notebook

    output_dir = output_dir.resolve()
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    executed = []
    for notebook in notebooks:
        print(f"running {notebook.name} ...", flush=True)
        declared = papermill.inspect_notebook(str(notebook))
        parameters = {"teacher_path": teacher_path, "output_dir": str(output_dir)}
        if teacher_path == "toy":  # the toy world's settings mean nothing to another teacher
            parameters.update({k: v for k, v in DEMO_PARAMETERS.get(notebook.name, {}).items() if k in declared})
        if "overwrite" in declared:
            parameters["overwrite"] = True  # the demo's own folder: each `make demo` starts it afresh
        executed.append(run_notebook(notebook, parameters, output_dir / notebook.name))
    print("\nexecuted notebooks:", *[f"  {p}" for p in executed], sep="\n")
    for label, path in (("what the experts draw", output_dir / "teacher_experts.png"),
                        ("student", output_dir / "distill" / "student"),
                        ("EMA student", output_dir / "distill" / "student_ema"),
                        ("student pipeline", output_dir / "distill" / "pipeline"),
                        ("training samples", output_dir / "distill" / "samples_grid.png"),
                        ("loss curve", output_dir / "distill" / "loss.png"),
                        ("teacher vs student", output_dir / "evaluate" / "teacher_vs_student.png"),
                        ("few-step pipeline", output_dir / "fewstep" / "pipeline"),
                        ("few-step samples", output_dir / "fewstep" / "steps_grid.png")):
        if path.exists():
            print(f"{label + ':':<22}{path}")
    return executed
