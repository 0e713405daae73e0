"""Bad input, table-driven, through every entry point: `distill()`, `wandistiller distill`, `wandistiller run`,
`load_teacher` and `project`. Each case must end in one line that names the problem and says what to do, an exit
status other than 0 from the command line, no traceback, and an untouched disk (no half-made cache or checkpoint).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wandistiller.cli import main
from wandistiller.data import packaged_file, read_prompts
from wandistiller.loops import distill
from wandistiller.projection import project
from wandistiller.teacher import load_teacher
from wandistiller.toy import tiny_wan_path

SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1, "image_size": 64}
NOTEBOOK = str(packaged_file("notebooks", "03_distill.ipynb"))
# exceptions through which the Python API reports a bad input; anything else (TypeError, KeyError, ...) is a crash
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder of good and bad input files, shared by all cases (none of them may change it)."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text("\n".join(read_prompts()[:2]), encoding="utf-8")
    (root / "empty_prompts.txt").write_text("# only a comment\n\n", encoding="utf-8")
    (root / "latin1_prompts.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "student.json").write_text(json.dumps(SMALL))
    (root / "broken_student.json").write_text('{"hidden_size": 16,\n "depth": 2\n "num_heads": 1}')
    (root / "typo_student.json").write_text(json.dumps({**SMALL, "hiden_size": 16}))
    (root / "text_student.json").write_text(json.dumps({**SMALL, "hidden_size": "sixteen"}))
    (root / "headless_student.json").write_text(json.dumps({**SMALL, "num_heads": 0}))
    (root / "a_file.txt").write_text("not a folder")
    (root / "empty_folder").mkdir()
    tiny = tiny_wan_path("a14b")
    not_wan = root / "not_wan"
    not_wan.mkdir()
    (not_wan / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": ["diffusers", "UNet2DConditionModel"]}))
    broken_index = root / "broken_index"
    shutil.copytree(tiny, broken_index)
    (broken_index / "model_index.json").write_text('{"_class_name": "WanPipeline",\n "boundary_ratio": 0.875,,}')
    truncated = root / "truncated_weights"
    shutil.copytree(tiny, truncated)
    weights = next((truncated / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "not_a_notebook.ipynb").write_text("these are not the cells you are looking for")
    existing = root / "existing_run"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return root


def snapshot(*folders: Path) -> dict:
    """Every file and folder under `folders`, with size and modification time."""
    found = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            if path.exists():
                stat = path.stat()
                found[str(path)] = (path.is_dir(), stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return found


def _filled(value, inputs: Path, tmp: Path):
    if isinstance(value, str):
        return value.format(inputs=inputs, tmp=tmp, notebook=NOTEBOOK)
    if isinstance(value, list):
        return [_filled(v, inputs, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, inputs, tmp) for k, v in value.items()}
    return value


def distill_call(**params):
    base = dict(data_path="{inputs}/prompts.txt", student_config="{inputs}/student.json", output_dir="{tmp}/run",
                progress=False)
    return "distill", {**base, **params}


def cli(*args):
    return "cli", list(args)


def cli_distill(*args):
    return cli("distill", "--data_path", "{inputs}/prompts.txt", "--student_config", "{inputs}/student.json",
               "--output_dir", "{tmp}/run", "--no-progress", *args)


def teacher_call(path="tiny", **kwargs):
    return "load_teacher", {"path_or_id": path, "device_strategy": "cpu", **kwargs}


def project_call(student=None, **kwargs):
    return "project", {"student_config": SMALL if student is None else student, **kwargs}


# (entry point and arguments, what the message must say is wrong, what it must say to do)
CASES = {
    "prompts file missing": (distill_call(data_path="{inputs}/missing.txt"),
        r"prompts file .*missing\.txt does not exist", r"pass data_path="),
    "prompts file without prompts": (distill_call(data_path="{inputs}/empty_prompts.txt"),
        r"has no prompts", r"write one prompt per line"),
    "prompts file not UTF-8": (distill_call(data_path="{inputs}/latin1_prompts.txt"),
        r"is not valid UTF-8", r"re-save it as UTF-8"),
    "student config missing": (distill_call(student_config="{inputs}/missing.json"),
        r"student config .*missing\.json does not exist", r"pass a JSON file"),
    "student config broken JSON": (distill_call(student_config="{inputs}/broken_student.json"),
        r"broken_student\.json is corrupt: not valid JSON at line 3, column 2", r"fix the file"),
    "student config typo": (distill_call(student_config="{inputs}/typo_student.json"),
        r"unknown student config key\(s\) \['hiden_size'\]", r"known keys"),
    "student config text for a number": (distill_call(student_config="{inputs}/text_student.json"),
        r"hidden_size='sixteen'", r"positive whole number"),
    "student config zero heads": (distill_call(student_config="{inputs}/headless_student.json"),
        r"num_heads=0", r"positive whole number"),
    "teacher path missing": (distill_call(teacher_path="{inputs}/no_teacher"),
        r"teacher path .*no_teacher does not exist", r"pass a local Wan Diffusers directory"),
    "teacher path is a file": (distill_call(teacher_path="{inputs}/a_file.txt"),
        r"teacher path .*a_file\.txt is a file", r"pass the diffusers pipeline directory"),
    "teacher folder is no pipeline": (distill_call(teacher_path="{inputs}/empty_folder"),
        r"no model_index\.json", r"pass a Wan 2\.x Diffusers checkpoint"),
    "teacher is not Wan": (distill_call(teacher_path="{inputs}/not_wan"),
        r"holds a StableDiffusionPipeline pipeline, not a Wan pipeline", r"pass a Wan 2\.x Diffusers checkpoint"),
    "teacher index broken JSON": (distill_call(teacher_path="{inputs}/broken_index"),
        r"model_index\.json is corrupt: not valid JSON at line 2", r"fix the file or re-download it"),
    "unknown teacher dtype": (distill_call(teacher_dtype="float64"),
        r"unknown dtype 'float64'", r"use one of float32"),
    "unknown device strategy": (distill_call(teacher_device_strategy="tpu"),
        r"unknown device strategy 'tpu'", r"use one of"),
    "unknown latent source": (distill_call(latent_source="video"),
        r"unknown latent_source 'video'", r"use one of trajectory"),
    "unknown teacher_targets": (distill_call(teacher_targets="sometimes"),
        r"teacher_targets .*'sometimes'", r"'cache' or 'online'"),
    "unknown mixed precision": (distill_call(mixed_precision="fp8"), r"mixed_precision .*'fp8'", r"auto, no or bf16"),
    "zero batch size": (distill_call(batch_size=0), r"batch_size=0", r"at least 1"),
    "zero checkpoint interval": (distill_call(checkpoint_interval=0), r"checkpoint_interval=0", r"at least 1"),
    "negative learning rate": (distill_call(lr=-1e-4), r"lr=-0\.0001", r"must be positive"),
    "EMA decay above one": (distill_call(ema_decay=1.5), r"ema_decay=1\.5", r"0 turns the EMA off"),
    "image size off the grid": (distill_call(height=60, width=64),
        r"image height 60 does not suit this teacher", r"use a multiple of 16"),
    "student_init folder missing": (distill_call(student_init="{inputs}/no_student"),
        r"student_init=.*no_student.* is neither", r"'projection', 'random' nor a saved student directory"),
    "output_dir is a file": (distill_call(output_dir="{inputs}/a_file.txt"),
        r"output_dir .*a_file\.txt is a file", r"choose a folder"),
    "output_dir holds a run": (distill_call(output_dir="{inputs}/existing_run"),
        r"already holds a run \(metrics\.jsonl\)", r"pass resume=True"),
    "misspelt parameter": (distill_call(num_epoch=3),
        r"unknown distill parameter\(s\) \['num_epoch'\]", r"see DistillConfig"),
    "second guidance scale for one expert": (distill_call(teacher_path="tiny-2.1", guidance_scale_2=3.0),
        r"guidance_scale_2 is the low-noise expert's scale", r"pass guidance_scale only"),
    "feature KD from the cache": (distill_call(feature_weight=0.5),
        r"feature_weight > 0 needs the teacher's features", r"set teacher_targets='online'"),
    "unknown cache dtype": (distill_call(cache_dtype="float8"),
        r"cache_dtype='float8' is not a cache dtype", r"use bfloat16 \(half the bytes\) or float32"),
    "one step per trajectory": (distill_call(steps_per_trajectory=1),
        r"steps_per_trajectory=1 must be a whole number from 2", r"or None for every step"),
    "images folder missing": (distill_call(latent_source="images", images_path="{inputs}/no_images"),
        r"images_path .*no_images is not a folder", r"pass a folder of images"),
    "CLI: text for a number": (cli_distill("--batch_size", "eight"),
        r"argument --batch_size: invalid int value: 'eight'", r"--help"),
    "CLI: unknown flag": (cli_distill("--learning_rate", "1e-3"),
        r"unrecognized arguments: --learning_rate 1e-3", r"--help"),
    "CLI: broken student config": (cli("distill", "--student_config", "{inputs}/broken_student.json",
                                       "--output_dir", "{tmp}/run"),
        r"is corrupt: not valid JSON at line 3", r"fix the file"),
    "CLI: teacher path missing": (cli_distill("--teacher_path", "{inputs}/no_teacher"),
        r"teacher path .* does not exist", r"pass a local Wan Diffusers directory"),
    "CLI: prompts without prompts": (cli_distill("--data_path", "{inputs}/empty_prompts.txt"),
        r"has no prompts", r"write one prompt per line"),
    "CLI: over an earlier run": (cli_distill("--output_dir", "{inputs}/existing_run"),
        r"already holds a run", r"pass resume=True"),
    "CLI: zero epochs": (cli_distill("--num_epochs", "0"), r"num_epochs=0", r"at least 1"),
    "CLI run: notebook missing": (cli("run", "{inputs}/missing.ipynb", "--output", "{tmp}/out.ipynb"),
        r"notebook .*missing\.ipynb does not exist", r"see notebooks/"),
    "CLI run: not a notebook": (cli("run", "{inputs}/not_a_notebook.ipynb", "--output", "{tmp}/out.ipynb"),
        r"not_a_notebook\.ipynb is not a notebook", r"pass an \.ipynb"),
    "CLI run: unknown parameter": (cli("run", "{notebook}", "-p", "num_epoch", "3", "--output", "{tmp}/out.ipynb"),
        r"unknown parameter\(s\) num_epoch for 03_distill\.ipynb", r"it takes .*num_epochs"),
    "CLI run: output is the notebook": (cli("run", "{notebook}", "--output", "{notebook}"),
        r"is the notebook itself", r"choose another path"),
    "CLI run: parameter without value": (cli("run", "{notebook}", "-p", "num_epochs"),
        r"argument -p/--parameter: expected 2 arguments", r"--help"),
    "teacher: unknown tiny variant": (teacher_call("tiny-9"),
        r"unknown tiny teacher 'tiny-9'", r"use tiny, tiny-a14b"),
    "teacher: truncated weights": (teacher_call("{inputs}/truncated_weights"),
        r"teacher weight file .*transformer.*safetensors is corrupt or truncated", r"re-download it"),
    "teacher: broken model index": (teacher_call("{inputs}/broken_index"),
        r"model_index\.json is corrupt", r"fix the file or re-download it"),
    "teacher: unknown dtype": (teacher_call(dtype="float64"), r"unknown dtype 'float64'", r"use one of"),
    "teacher: unknown device strategy": (teacher_call(device_strategy="tpu"),
        r"unknown device strategy 'tpu'", r"use one of"),
    "project: unknown width method": (project_call(width="magic"), r"unknown width method 'magic'", r"use one of"),
    "project: layer beyond the teacher": (project_call(layers=[0, 9]),
        r"layers=\[0, 9\] must list 2 teacher block indices in \[0, 4\)", r"must list"),
    "project: unknown layers method": (project_call(layers="random"),
        r"unknown layers method 'random'", r"use one of"),
    "project: unknown expert": (project_call(expert="middle"), r"unknown expert 'middle'", r"use one of"),
    "project: heads do not divide width": (project_call({"hidden_size": 20, "depth": 2, "num_heads": 3}),
        r"hidden_size=20 is not divisible by num_heads=3", r"choose num_heads that divides hidden_size"),
    "project: deeper than the teacher": (project_call({**SMALL, "depth": 9}),
        r"student depth 9 exceeds the teacher's", r"the teacher's \d+ blocks"),
    "project: wider than the teacher": (project_call({"hidden_size": 64, "depth": 2, "num_heads": 2}, width="truncate"),
        r"attention_head_dim=32 exceeds the teacher's 16", r"projection only removes width"),
    "project: broken config file": (project_call("{inputs}/broken_student.json"),
        r"broken_student\.json is corrupt: not valid JSON at line 3, column 2", r"fix the file"),
}


def _run(entry: str, args, tiny_teacher, capsys) -> tuple[str, int | None]:
    """(message, exit status): the exception's text from the API, stderr and the status from the CLI."""
    if entry == "cli":
        try:
            status = main(args)
        except SystemExit as exit_:  # argparse
            status = exit_.code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err + captured.out
        return captured.err.strip(), status
    call = {"distill": lambda: distill(**args), "load_teacher": lambda: load_teacher(**args),
            "project": lambda: project(tiny_teacher, **args)}[entry]
    with pytest.raises(USER_ERRORS) as err:
        call()
    assert not isinstance(err.value, json.JSONDecodeError), "a bare JSON error names neither the file nor the fix"
    return str(err.value), None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(case, inputs, tmp_path, tiny_teacher, capsys, monkeypatch):
    (entry, args), problem, fix = CASES[case]
    args = _filled(args, inputs, tmp_path)
    monkeypatch.chdir(tmp_path)  # anything written to a relative default folder would show in the snapshot
    before = snapshot(inputs, tmp_path)
    message, status = _run(entry, args, tiny_teacher, capsys)
    print(f"{case}: {message}")
    assert "\n" not in message, f"more than one line:\n{message}"
    assert re.search(problem, message), f"the problem is not named: {message}"
    assert re.search(fix, message), f"no way out is given: {message}"
    if entry == "cli":
        assert status not in (0, None)
    assert snapshot(inputs, tmp_path) == before, "the disk changed"


def test_the_bad_input_table_covers_every_entry_point():
    entries = {f"wandistiller {args[0]}" if entry == "cli" else entry for (entry, args), _, _ in CASES.values()}
    assert entries == {"distill", "wandistiller distill", "wandistiller run", "load_teacher", "project"}
    assert len(CASES) >= 20


def test_the_command_exits_non_zero_without_a_traceback(inputs, tmp_path):
    """The installed command as a user runs it: a separate process, its exit status and all of its output."""
    command = [sys.executable, "-m", "wandistiller", "distill", "--student_config", str(inputs / "broken_student.json"),
               "--output_dir", str(tmp_path / "run")]
    before = snapshot(inputs, tmp_path)
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"wandistiller: error: {inputs / 'broken_student.json'} is corrupt: not valid JSON at line 3, column 2 "
        "(Expecting ',' delimiter); fix the file"]
    assert snapshot(inputs, tmp_path) == before
