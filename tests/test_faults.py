"""Faults: a run killed (SIGKILL) at any of 16 points resumes to the uninterrupted run's state bit for bit, never
loads a partial file and repeats at most one checkpoint interval; a full disk while a checkpoint is written keeps
the previous one; a checkpoint that would run code when unpickled is refused; a dead rank ends a 2-rank job.

Kills are injected in a child process that wraps one function (a writer, a forward, the optimiser step) and
SIGKILLs itself at its n-th matching call: before it, after it, or after cutting its write short (half a file,
half a line, half a folder deleted), which is what a kill in the middle of that write leaves.
"""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_loops import SMALL, TINY_EXPERT, _cli_inputs, _free_port, assert_same, assert_same_final_state

from wandistiller.cli import main
from wandistiller.data import read_prompts
from wandistiller.loops import distill, list_checkpoints
from wandistiller.model import WanLiteTransformer2DModel

_KILLER = r'''
import json, os, signal, sys
from importlib import import_module
from pathlib import Path

point = json.loads(sys.argv[1])  # null: no kill
seen = 0


def cut_short(path, appended):
    """What a kill in the middle of this write leaves: half the file, or half the line it appended."""
    data = Path(path).read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1 if appended else 0
    os.truncate(path, start + (len(data) - start) // 2)


def wrapper(*args, **kwargs):
    global seen
    path = str(args[point["path_arg"]]) if point["path_arg"] is not None else ""
    if point["match"] not in path:
        return original(*args, **kwargs)
    seen += 1
    if seen != point["nth"]:
        return original(*args, **kwargs)
    if point["when"] == "half-deleted":  # a folder removal cut short: its first file is gone, the rest is not
        next(f for f in sorted(Path(path).rglob("*")) if f.is_file()).unlink()
    elif point["when"] != "before":
        original(*args, **kwargs)
        if point["when"].startswith("torn"):
            cut_short(path, appended=point["when"] == "torn-append")
    os.kill(os.getpid(), signal.SIGKILL)


if point:
    owner = import_module(point["module"])
    for name in point["owner"]:
        owner = getattr(owner, name)
    original = getattr(owner, point["function"])
    setattr(owner, point["function"], wrapper)
from wandistiller.cli import main

sys.exit(main(["distill", *sys.argv[2:]]))
'''


def kill_point(where: str, function: str, *, path_arg=None, match: str = "", nth: int = 1,
               when: str = "before") -> dict:
    """`where` is "module" or "module:Class"; the child dies at the `nth` call of `function` whose path argument
    contains `match`."""
    module, _, owner = where.partition(":")
    return dict(module=module, owner=owner.split(".") if owner else [], function=function, path_arg=path_arg,
                match=match, nth=nth, when=when)


# In the order a run meets them; each kill interrupts the run that resumed from the kill before.
KILL_POINTS = {
    "prompt embeddings: second shard": kill_point("safetensors.torch", "save_file", path_arg=1, match="text_00001",
                                                  when="torn"),
    "teacher forward while recording": kill_point("diffusers:WanTransformer3DModel", "forward", nth=5),
    "target cache: second shard": kill_point("safetensors.torch", "save_file", path_arg=1, match="shard_00001",
                                             when="torn"),
    "target cache: manifest": kill_point("os", "replace", path_arg=1, match="manifest.json"),
    "student forward": kill_point("wandistiller.model:WanLiteTransformer2DModel", "forward", nth=2),
    "optimiser step": kill_point("torch.optim:AdamW", "step", nth=4, when="after"),
    "checkpoint: training state": kill_point("torch", "save", path_arg=1, match="training_state", when="torn"),
    "checkpoint: rename into place": kill_point("os", "replace", path_arg=1, match="step_0000006"),
    "metrics line": kill_point("wandistiller.loops", "_append_metrics", path_arg=0, nth=2, when="torn-append"),
    "metrics rewrite on resume": kill_point("pathlib:Path", "write_text", path_arg=0, match="metrics.jsonl",
                                            when="torn"),
    "sample image": kill_point("PIL.Image:Image", "save", path_arg=1, match="epoch_0001_sample_01", when="torn"),
    "old checkpoint removal": kill_point("shutil", "rmtree", path_arg=0, match="step_0000003", when="half-deleted"),
    "last checkpoint": kill_point("torch", "save", path_arg=1, match="step_0000016", when="torn"),
    "last samples": kill_point("PIL.Image:Image", "save", path_arg=1, match="epoch_0002_sample_00", when="torn"),
    "final student": kill_point("safetensors.torch", "save_file", path_arg=1, match="chain/student/", when="torn"),
    "exported pipeline": kill_point("safetensors.torch", "save_file", path_arg=1, match="chain/.pipeline.",
                                    when="torn"),
}
INTERVAL = 3


def _chain_args(root: Path) -> list[str]:
    """16 prompts (two cache shards) x 2 trajectory steps = 32 targets, batch 4: 8 steps an epoch, 16 in all,
    a checkpoint every 3 steps (two kept), samples after each epoch, EMA on."""
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:16]), encoding="utf-8")
    config = root / "student.json"
    config.write_text(json.dumps(SMALL))
    return ["--data_path", str(prompts), "--student_config", str(config), "--student_init", "random",
            "--num_inference_steps", "2", "--batch_size", "4", "--num_epochs", "2", "--lr", "1e-3",
            "--checkpoint_interval", str(INTERVAL), "--keep_checkpoints", "2", "--ema_decay", "0.9",
            "--no-progress", "--resume"]


def _child(point: dict | None, out: Path, args: list[str], script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), json.dumps(point), "--output_dir", str(out), *args],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)


def _steps_recorded(out: Path) -> int:
    """The last step whose metrics line is complete."""
    last = 0
    path = out / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            last = json.loads(line)["step"]
        except json.JSONDecodeError:
            break
    return last


def _assert_nothing_partial_is_listed(out: Path) -> None:
    """What a resume may read is complete: every listed checkpoint, and a cache with a manifest."""
    for checkpoint in list_checkpoints(out):
        load_file(checkpoint / "student" / "diffusion_pytorch_model.safetensors")
        torch.load(checkpoint / "training_state.pt", weights_only=True)
    manifest = out / "cache" / "manifest.json"
    if manifest.is_file():
        for shard in json.loads(manifest.read_text())["shards"]:
            load_file(out / "cache" / shard["file"])
            load_file(out / "cache" / shard["text"])
        load_file(out / "cache" / "negative_embeds.safetensors")


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")
            and not any(part.startswith(".") for part in p.relative_to(out).parts)}


@pytest.mark.slow
def test_a_run_killed_at_16_points_resumes_to_the_uninterrupted_state(tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    args = _chain_args(tmp_path)
    reference = _child(None, tmp_path / "reference", args, script)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "chain"
    repeated = {}
    for name, point in KILL_POINTS.items():
        done = _child(point, out, args, script)
        assert done.returncode == -signal.SIGKILL, f"{name}: the run was not killed there\n{done.stderr[-3000:]}"
        _assert_nothing_partial_is_listed(out)
        checkpoints = list_checkpoints(out)
        resume_from = int(checkpoints[-1].name.split("_")[1]) if checkpoints else 0
        repeated[name] = _steps_recorded(out) - resume_from
        assert repeated[name] <= INTERVAL, f"{name}: a resume would repeat {repeated[name]} steps"
        if name == "target cache: second shard":
            first_shard = (out / "cache" / "shard_00000.safetensors").stat().st_mtime_ns
    finished = _child(None, out, args, script)
    assert finished.returncode == 0, finished.stderr[-3000:]
    print("steps a resume repeats after each kill:", repeated)

    assert _files(out) == _files(tmp_path / "reference"), "files lost or extra"
    print("temporary files left by the kills:", sorted(str(p.relative_to(out)) for p in out.rglob(".*")))
    assert not list((out / "checkpoints").glob(".*"))
    assert (out / "cache" / "shard_00000.safetensors").stat().st_mtime_ns == first_shard  # kept, not redone
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (tmp_path / "reference", out)]
    assert len(losses[1]) == 16 and losses[1] == losses[0]
    assert_same_final_state(tmp_path / "reference", out)
    for shard in ("negative_embeds.safetensors", "text_00000.safetensors", "text_00001.safetensors",
                  "shard_00000.safetensors", "shard_00001.safetensors"):
        assert_same(load_file(tmp_path / "reference" / "cache" / shard), load_file(out / "cache" / shard), shard)
    for image in sorted((out / "samples").glob("*.png")):
        Image.open(image).verify()  # complete
        if "_sample_" in image.name:  # (a grid shows the teacher's row only when its run loaded the teacher)
            assert image.read_bytes() == (tmp_path / "reference" / "samples" / image.name).read_bytes(), image.name


def _short_run(tmp_path: Path) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:2]), encoding="utf-8")
    init = tmp_path / "init"
    WanLiteTransformer2DModel.from_student_config(SMALL, TINY_EXPERT, seed=0).save_pretrained(init)
    return dict(data_path=str(prompts), student_config=SMALL, student_init=str(init), latent_source="noise",
                samples_per_prompt=2, batch_size=2, num_epochs=2, max_steps=4, checkpoint_interval=2, progress=False,
                save_samples=False, output_dir=str(tmp_path / "run"))


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = _short_run(tmp_path)
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if "step_0000004" in str(f):
            with open(f, "wb") as partial:
                partial.write(b"PK")  # the writer got this far
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    flags = [f"--{k}={v}" for k, v in run.items() if k not in ("student_config", "progress", "save_samples")]
    argv = ["distill", *flags, "--student_config", str(tmp_path / "student.json"), "--no-progress", "--no-save_samples"]
    (tmp_path / "student.json").write_text(json.dumps(SMALL))
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (progress bars of loading and saving come before)
    print(error)
    assert error.startswith("wandistiller: error: ")
    assert "checkpoint step_0000004 could not be written ([Errno 28] No space left on device)" in error
    assert "step_0000002, is intact" in error and "resume" in error
    assert [c.name for c in list_checkpoints(run["output_dir"])] == ["step_0000002"]
    assert not list((Path(run["output_dir"]) / "checkpoints").glob(".*"))  # the partial checkpoint is gone
    monkeypatch.setattr(torch, "save", real_save)
    resumed = distill(**{**run, "student_config": str(tmp_path / "student.json")}, resume=True)
    assert resumed.steps == 4 and [c.name for c in resumed.checkpoints] == ["step_0000002", "step_0000004"]


class _Payload:
    """Unpickling this creates a file: the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    run = _short_run(tmp_path)
    distill(**{**run, "max_steps": 2})
    checkpoint = list_checkpoints(run["output_dir"])[-1]
    marker = tmp_path / "payload_ran"
    state_file = checkpoint / "training_state.pt"
    honest = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    state["optimizer"] = _Payload(marker)
    torch.save(state, state_file)
    with open(tmp_path / "check.pkl", "wb") as f:  # the payload is real: plain unpickling runs it
        pickle.dump(_Payload(tmp_path / "unpickled"), f)
    with open(tmp_path / "check.pkl", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "unpickled").exists()

    with pytest.raises(ValueError, match=r"training_state\.pt holds Python objects besides tensors and is refused") \
            as err:
        distill(**run, resume=True)
    assert "\n" not in str(err.value) and "move the folder away" in str(err.value)
    assert not marker.exists()

    # the same payload as the student's weights, in the pickle format diffusers would also read
    state_file.write_bytes(honest)
    weights = checkpoint / "student" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"proj_out.weight": _Payload(marker)}, checkpoint / "student" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"has no diffusion_pytorch_model\.safetensors \(student weights are read "
                                         r"from safetensors only\)"):
        distill(**run, resume=True)
    assert not marker.exists()


_RANK_DIES = """
import os, signal, sys, time
from pathlib import Path
import torch.optim

original = torch.optim.AdamW.step
steps = 0


def step(self, *args, **kwargs):
    global steps
    result = original(self, *args, **kwargs)
    steps += 1
    if os.environ["RANK"] == "1" and steps == 3:
        Path(sys.argv[1]).write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return result


torch.optim.AdamW.step = step
from wandistiller.cli import main
sys.exit(main(["distill", *sys.argv[2:]]))
"""


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_two_rank_job(tmp_path):
    script = tmp_path / "rank_dies.py"
    script.write_text(_RANK_DIES)
    died = tmp_path / "rank_1_died_at"
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               str(script), str(died), *_cli_inputs(tmp_path), "--distributed", "--student_init", "random",
               "--batch_size", "8", "--num_epochs", "4", "--checkpoint_interval", "2", "--output_dir", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=900)
    ended = time.time()
    assert done.returncode != 0
    assert died.is_file(), done.stderr[-3000:]
    waited = ended - float(died.read_text())
    print(f"the job ended {waited:.1f} s after rank 1 died")
    assert waited < 60
    last = list_checkpoints(out)[-1]
    assert last.name == "step_0000002"
    load_file(last / "student" / "diffusion_pytorch_model.safetensors")
    torch.load(last / "training_state.pt", weights_only=True)
