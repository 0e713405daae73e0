"""Recording as its own job and training streamed from the cache over ranks (issue 11): `wandistiller
record-targets` on 2 ranks (torchrun, gloo on the CPU), then training from that cache without the teacher, and a
2-rank run over the streamed cache killed and resumed, against one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_loops import SMALL, _free_port, _losses

import wandistiller.teacher
from wandistiller.cache import build_target_cache, load_target_cache
from wandistiller.data import TargetSpec, read_prompts
from wandistiller.loops import distill, list_checkpoints

# 72 prompts: 9 shards of 8, so two shuffle windows of 8 shards; one noise sample each (72 targets, 9 steps an epoch)
NUM_PROMPTS = 72
SPEC = TargetSpec(latent_source="noise", samples_per_prompt=1)  # as the flags below ask (64x64, 8 steps, bf16)


def _torchrun(*args, output=subprocess.PIPE):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "wandistiller", *args]
    return subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=output, stderr=output,
                            text=True)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, children before grandchildren)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The target cache `wandistiller record-targets` writes on 2 ranks, and the flags it was given."""
    root = tmp_path_factory.mktemp("recorded")
    wandistiller.teacher.locate_teacher("tiny")  # built here once: two ranks must not both build it
    base = read_prompts()
    (root / "prompts.txt").write_text("\n".join(f"{base[i % len(base)]}, take {i}" for i in range(NUM_PROMPTS)))
    (root / "student.json").write_text(json.dumps(SMALL))
    flags = ["--data_path", str(root / "prompts.txt"), "--student_config", str(root / "student.json"),
             "--latent_source", "noise", "--samples_per_prompt", "1", "--cache_dir", str(root / "cache")]
    job = _torchrun("record-targets", *flags, "--no-progress", "--distributed")
    out, err = job.communicate(timeout=900)
    assert job.returncode == 0, err[-3000:]
    return root, flags, out


@pytest.mark.slow
def test_record_targets_on_two_ranks_then_training_without_the_teacher(recorded, tmp_path, monkeypatch):
    root, flags, out = recorded
    cache = root / "cache"
    assert out.count("target cache complete in") == 1  # rank 0 reports
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [8] * 9 and not (cache / "cache.lock").exists()
    # the shards the two ranks wrote are the ones one process writes
    prompts = read_prompts(root / "prompts.txt")
    teacher = wandistiller.teacher.load_teacher("tiny", device_strategy="cpu", load_experts=False)
    build_target_cache(teacher, prompts, tmp_path / "one", SPEC, progress=False)
    two, _ = load_target_cache(cache, teacher.fingerprint, SPEC, prompts)
    one, _ = load_target_cache(tmp_path / "one", teacher.fingerprint, SPEC, prompts)
    for key in one.tensors:  # reduction order (other batches) only, which may move a bf16 value by one step
        torch.testing.assert_close(two.tensors[key], one.tensors[key], rtol=2**-7, atol=1e-5)
    for shard in manifest["shards"]:  # each shard's prompts encoded together either way: bit for bit
        for key, value in load_file(tmp_path / "one" / shard["text"]).items():
            assert torch.equal(load_file(cache / shard["text"])[key], value)
    del teacher

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded when training from a recorded cache")

    monkeypatch.setattr(wandistiller.teacher, "load_teacher", refuse)
    from wandistiller.cli import main

    assert main(["record-targets", *flags, "--no-progress"]) == 0  # complete: nothing to do, no teacher
    result = distill(output_dir=str(tmp_path / "run"), data_path=str(root / "prompts.txt"), student_config=SMALL,
                     student_init="random", latent_source="noise", samples_per_prompt=1, cache_dir=str(cache),
                     batch_size=8, max_steps=4, progress=False)
    assert result.steps == 4 and (result.output_dir / "pipeline").is_dir() and result.sample_paths


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_over_the_streamed_cache_match_one_process(recorded, tmp_path):
    root, flags, _ = recorded
    training = [*flags, "--student_init", "random", "--batch_size", "8", "--num_epochs", "3", "--max_steps", "24",
                "--lr", "1e-3", "--checkpoint_interval", "4", "--keep_checkpoints", "10", "--no-save_samples",
                "--no-progress"]
    from wandistiller.cli import main

    assert main(["distill", "--output_dir", str(tmp_path / "one"), *training]) == 0
    run = tmp_path / "two"
    job = _torchrun("distill", "--distributed", "--output_dir", str(run), *training, output=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "checkpoints" / "step_0000008").exists() and job.poll() is None:
        time.sleep(0.01)
    for pid in [job.pid, *_descendants(job.pid)]:  # torchrun and both ranks (in sessions of their own)
        os.kill(pid, signal.SIGKILL)
    job.communicate()
    killed_at = list_checkpoints(run)[-1].name
    assert "step_0000008" <= killed_at < "step_0000024", "the run was not killed mid-way"
    resumed = _torchrun("distill", "--distributed", "--output_dir", str(run), *training, "--resume")
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    one, two = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(run / "metrics.jsonl")
    print(f"killed at {killed_at}\n1 process", [round(x, 5) for x in one], "\n2 ranks  ", [round(x, 5) for x in two])
    assert len(one) == len(two) == 24 and two == pytest.approx(one, rel=1e-4)  # reduction order only
    states = [torch.load(folder / "checkpoints" / "step_0000024" / "training_state.pt", weights_only=True)
              for folder in (tmp_path / "one", run)]
    assert [(s["step"], s["epoch"], s["batch_in_epoch"]) for s in states] == [(24, 2, 6)] * 2  # the data position
    weights = [load_file(folder / "student" / "diffusion_pytorch_model.safetensors") for folder in (tmp_path / "one", run)]
    for key in weights[0]:  # tolerance: reduction order only
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-3, atol=1e-5)
