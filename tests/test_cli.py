import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wandistiller.cli import main, parse_parameter_value, rank_output_path
from wandistiller.data import read_prompts

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_03 = ROOT / "notebooks" / "03_distill.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _few_prompts(tmp_path, n=8):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(read_prompts()[:n]), encoding="utf-8")
    return path


def _image_outputs(notebook: Path) -> list[list]:
    nb = json.loads(notebook.read_text())
    return [[o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})] for cell in nb["cells"]]


def test_parameter_values_are_read_like_papermill():
    assert parse_parameter_value("3") == 3
    assert parse_parameter_value("1e-3") == 0.001
    assert parse_parameter_value("True") is True
    assert parse_parameter_value("None") is None
    assert parse_parameter_value("tiny") == "tiny"
    assert parse_parameter_value("../data/p.txt") == "../data/p.txt"


def test_every_distill_flag_has_its_config_fields_description():
    import argparse
    import dataclasses

    from wandistiller.cli import build_parser
    from wandistiller.loops import DistillConfig

    docs = DistillConfig.docs()
    fields = [f.name for f in dataclasses.fields(DistillConfig)]
    assert set(docs) == set(fields), "every DistillConfig field is described in its Parameters section, and no other"
    command = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["distill"]
    flags = {a.dest: a.help for a in command._actions if a.dest != "help"}
    assert set(flags) == set(fields) - {"callbacks"}
    for name, text in flags.items():
        assert text.startswith(docs[name].rstrip(".")) and len(docs[name]) > 10, name
    help_text = command.format_help()  # argparse expands every help string (a stray % would fail here)
    assert "cache (computed once, then training without the teacher)" in " ".join(help_text.split())


def test_rank_output_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_output_path(Path("out/03.ipynb")) == Path("out/03.ipynb")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_output_path(Path("out/03.ipynb")) == Path("out/03.rank1.ipynb")


def test_unknown_parameter_and_missing_notebook_are_errors(tmp_path, capsys):
    assert main(["run", str(NOTEBOOK_03), "-p", "num_epoch", "1", "--output", str(tmp_path / "o.ipynb")]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) num_epoch" in err and "num_epochs" in err
    assert not (tmp_path / "o.ipynb").exists()
    assert main(["run", str(tmp_path / "nope.ipynb")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_distill_notebook_headless(tmp_path):
    out = tmp_path / "out"
    executed = tmp_path / "executed" / "03.ipynb"
    cmd = [sys.executable, "-m", "wandistiller", "run", str(NOTEBOOK_03), "-p", "output_dir", str(out),
           "-p", "data_path", str(_few_prompts(tmp_path)), "-p", "num_epochs", "2", "-p", "batch_size", "4",
           "--output", str(executed)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"executed notebook written to {executed}" in run.stdout
    student = out / "distill" / "student"
    assert (student / "config.json").is_file()
    metrics = (out / "distill" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 * (8 * 8 // 4)  # 8 prompts x 8 trajectory steps, batch 4, 2 epochs
    images = _image_outputs(executed)
    # the training cell stores exactly the final loss plot and the final sample grid, once each
    assert max(len(outputs) for outputs in images) == 2
    assert (out / "distill" / "loss.png").stat().st_size > 0
    assert (out / "distill" / "samples_grid.png").stat().st_size > 0


@pytest.mark.slow
def test_run_under_torchrun_writes_one_notebook_per_rank_and_one_student(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "wandistiller", "run", str(NOTEBOOK_03), "-p", "distributed", "True", "-p", "output_dir", str(out),
           "-p", "data_path", str(_few_prompts(tmp_path)), "-p", "num_epochs", "1", "-p", "batch_size", "4",
           "--output", str(tmp_path / "runs" / "03.ipynb")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["03.rank0.ipynb", "03.rank1.ipynb"]
    assert run.stdout.count("executed notebook written to") == 1  # rank 0 alone talks
    assert (out / "distill" / "student" / "config.json").is_file()
    assert [p.name for p in (out / "distill" / "checkpoints").iterdir()] == ["step_0000016"]
    assert len((out / "distill" / "metrics.jsonl").read_text().splitlines()) == 16
    # only rank 0 plotted
    assert max(len(o) for o in _image_outputs(tmp_path / "runs" / "03.rank0.ipynb")) == 2
    assert max(len(o) for o in _image_outputs(tmp_path / "runs" / "03.rank1.ipynb")) == 0


def test_relative_paths_on_the_command_line_mean_the_callers_folder(tmp_path, monkeypatch):
    from wandistiller.cli import _absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    out = _absolute_paths({"data_path": "prompts.txt", "output_dir": "runs/a", "teacher_path": "tiny",
                           "student_config": "missing.json", "num_epochs": 3})
    assert out == {"data_path": str(tmp_path / "prompts.txt"), "output_dir": str(tmp_path / "runs" / "a"),
                   "teacher_path": "tiny", "student_config": "missing.json", "num_epochs": 3}


# --- wandistiller generate ---------------------------------------------------------------------------------------

GENERATE = ["--num_inference_steps", "2", "--height", "32", "--width", "48"]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, wandistiller_home):
    """A distillation run's output_dir holding only its exported pipeline (a small student of the 2.1 teacher)."""
    from wandistiller.model import WanLiteTransformer2DModel
    from wandistiller.pipeline import export_pipeline
    from wandistiller.teacher import load_teacher

    teacher = load_teacher("tiny-2.1", device_strategy="cpu")
    student = WanLiteTransformer2DModel.from_student_config({"hidden_size": 32, "depth": 1, "num_heads": 2},
                                                            teacher.pipe.transformer, seed=0)
    run = tmp_path_factory.mktemp("run")
    export_pipeline(run / "pipeline", student, teacher.source, cfg_distilled=True)
    return run


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_is_deterministic_per_seed_and_tiles_prompts_in_order(exported_run, tmp_path, capsys):
    grid = tmp_path / "out" / "grid.png"
    cmd = [sys.executable, "-m", "wandistiller", "generate", "--model", str(exported_run / "pipeline"),
           "--prompt", "a red fox", "--prompt", "a blue cat", "--output", str(grid), "--seed", "3", *GENERATE]
    # A fresh process, offline, in another folder: nothing but the pipeline folder is needed.
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"2 image(s) written to {grid}" in run.stdout
    tiles = _pixels(grid)
    assert tiles.shape == (32, 2 * 48, 3)  # two prompts side by side
    assert main(["generate", "--model", str(exported_run), "--prompt", "a red fox", "--prompt", "a blue cat",
                 "--output", str(grid), "--seed", "3", *GENERATE]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "--model", str(exported_run), "--prompt", "a red fox", "--prompt", "a blue cat",
                 "--output", str(grid), "--seed", "3", "--overwrite", *GENERATE]) == 0
    assert (_pixels(grid) == tiles).all()  # same seed, same image (and the run folder finds its pipeline/)
    alone = tmp_path / "fox.png"
    assert main(["generate", "--model", str(exported_run), "--prompt", "a red fox", "--output", str(alone),
                 "--seed", "3", *GENERATE]) == 0
    # The fox's image does not depend on the other prompt (batched vs alone: reduction order, at most 1 level).
    # (The random tiny model barely listens to text, so the two tiles look alike: their order is not checked here.)
    assert abs(_pixels(alone) - tiles[:, :48]).max() <= 1
    other_seed = tmp_path / "fox_seed4.png"
    assert main(["generate", "--model", str(exported_run), "--prompt", "a red fox", "--output", str(other_seed),
                 "--seed", "4", *GENERATE]) == 0
    assert abs(_pixels(other_seed) - _pixels(alone)).max() > 10


@pytest.mark.parametrize("model, output, message", [
    ("teacher", "x.png", "holds a WanPipeline, not a Wan-Lite pipeline"),
    ("empty", "x.png", "no Wan-Lite pipeline in"),
    ("missing", "x.png", "does not exist"),
    ("run", "x.unknown", "no image extension PIL can write"),
])
def test_generate_errors_are_one_line_and_write_nothing(exported_run, tmp_path, capsys, model, output, message):
    from wandistiller.toy import tiny_wan_path

    folders = {"teacher": tiny_wan_path("2.1"), "empty": tmp_path / "empty", "missing": tmp_path / "missing",
               "run": exported_run}
    (tmp_path / "empty").mkdir()
    out = tmp_path / output
    assert main(["generate", "--model", str(folders[model]), "--prompt", "a cat", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
