"""`make demo`: the notebooks 01 -> 04 executed headless on the embedded tiny teacher."""

from __future__ import annotations

from pathlib import Path

from .data import packaged_file

NOTEBOOK_DIR = packaged_file("notebooks")


def run_demo(output_dir: Path, teacher_path: str = "tiny") -> list[Path]:
    """Run every numbered notebook in order, each writing into `output_dir`; print where the results are."""
    import papermill

    from .cli import run_notebook

    output_dir = output_dir.resolve()
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    executed = []
    for notebook in notebooks:
        print(f"running {notebook.name} ...", flush=True)
        parameters = {"teacher_path": teacher_path, "output_dir": str(output_dir)}
        if "overwrite" in papermill.inspect_notebook(str(notebook)):
            parameters["overwrite"] = True  # the demo's own folder: each `make demo` starts it afresh
        executed.append(run_notebook(notebook, parameters, output_dir / notebook.name))
    print("\nexecuted notebooks:", *[f"  {p}" for p in executed], sep="\n")
    for label, path in (("student", output_dir / "distill" / "student"),
                        ("EMA student", output_dir / "distill" / "student_ema"),
                        ("training samples", output_dir / "distill" / "samples_grid.png"),
                        ("loss curve", output_dir / "distill" / "loss.png"),
                        ("teacher vs student", output_dir / "evaluate" / "teacher_vs_student.png")):
        if path.exists():
            print(f"{label + ':':<20}{path}")
    return executed
