import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wandistiller.teacher
from wandistiller.cache import build_target_cache, load_target_cache
from wandistiller.data import TargetSpec, read_prompts
from wandistiller.loops import DEFAULT_STUDENT_CONFIG, Callback, DistillConfig, distill, list_checkpoints
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.projection import project

SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1, "image_size": 64}
TINY_EXPERT = {"in_channels": 16, "out_channels": 16, "text_dim": 32, "patch_size": (1, 2, 2), "freq_dim": 256,
               "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 4}


def _losses(path):
    return [json.loads(line)["loss"] for line in Path(path).read_text().splitlines()]


def _matching_error(student, targets):
    """Mean squared error between the student's velocity and the cached (guided) teacher target over a target set."""
    t = targets.tensors
    with torch.no_grad():
        pred = student(t["latents"], t["timesteps"], targets.prompt_embeds[t["prompt_index"]]).sample
    return float((pred - t["velocity"]).pow(2).mean())


def test_production_run_55_prompts_one_epoch(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:55]), encoding="utf-8")
    result = distill(data_path=str(prompts), output_dir=str(tmp_path / "run"), num_epochs=1, batch_size=8,
                     lr=2e-3, warmup_steps=5, checkpoint_interval=20, progress=False)
    spec = TargetSpec(height=64, width=64, num_inference_steps=8, samples_per_prompt=4)
    fingerprint = wandistiller.teacher.read_teacher_info("tiny").fingerprint()
    targets, manifest = load_target_cache(tmp_path / "run" / "cache", fingerprint, spec, read_prompts(prompts))
    assert len(manifest["prompts"]) == 55 and len(targets) == 55 * 8  # every step of every trajectory
    assert result.steps == len(targets) // 8
    reloaded = WanLiteTransformer2DModel.from_pretrained(result.student_path)
    # the student distill() started from: the same deterministic projection, calibrated on the first 8 prompts
    teacher = wandistiller.teacher.load_teacher("tiny", device_strategy="cpu")
    initial, _ = project(teacher, DEFAULT_STUDENT_CONFIG, calibration={"prompts": read_prompts(prompts)[:8]})
    first = _matching_error(initial, targets)
    last = _matching_error(reloaded, targets)
    losses = [m["loss"] for m in result.metrics]
    print(f"loss first 5 steps {sum(losses[:5]) / 5:.4f} -> last 5 {sum(losses[-5:]) / 5:.4f}; "
          f"matching error projected init {first:.4f} -> trained {last:.4f}")
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert last < first
    assert result.ema_path is not None and (result.ema_path / "config.json").is_file()
    grid = result.grid_paths[-1]
    assert grid.is_file() and [p.name for p in result.sample_paths] == ["epoch_0001_sample_00.png",
                                                                         "epoch_0001_sample_01.png"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "epoch", "loss", "velocity", "lr", "samples_per_s"} <= set(record)


def test_cached_training_needs_no_teacher_and_matches_online(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:6]), encoding="utf-8")
    init = tmp_path / "init"
    WanLiteTransformer2DModel.from_student_config(SMALL, TINY_EXPERT, seed=0).save_pretrained(init)
    common = dict(data_path=str(prompts), student_config=SMALL, student_init=str(init), latent_source="noise",
                  samples_per_prompt=4, batch_size=4, num_epochs=2, lr=1e-3, ema_decay=0, progress=False,
                  save_samples=False, cache_dtype="float32")  # float32: the online targets are not rounded
    online = distill(output_dir=str(tmp_path / "online"), teacher_targets="online", **common)

    teacher = wandistiller.teacher.load_teacher("tiny", device_strategy="cpu", load_experts=False)
    spec = TargetSpec(latent_source="noise", samples_per_prompt=4, height=64, width=64, num_inference_steps=8,
                      dtype="float32")
    build_target_cache(teacher, read_prompts(prompts), tmp_path / "cached" / "cache", spec, progress=False)
    del teacher

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher must not be loaded when training from the cache")

    monkeypatch.setattr(wandistiller.teacher, "load_teacher", refuse)
    cached = distill(output_dir=str(tmp_path / "cached"), teacher_targets="cache", **common)
    assert cached.steps == online.steps == 12
    a, b = _losses(online.metrics_path), _losses(cached.metrics_path)
    print("online", [round(x, 5) for x in a])
    print("cached", [round(x, 5) for x in b])
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_training_streamed_from_disk_equals_training_from_memory(tmp_path, monkeypatch):
    """distill() reads the cache from disk record by record (cache.TargetShards); with the cache loaded whole into
    memory instead (cache.load_target_cache) it trains the same run bit for bit, over several shuffle windows
    (a window of one shard here, so 12 prompts make two)."""
    import wandistiller.cache
    import wandistiller.loops

    monkeypatch.setattr(wandistiller.cache, "SHUFFLE_WINDOW_SHARDS", 1)
    common = dict(data_path=_prompts_file(tmp_path, 12), student_config=SMALL, student_init="random",
                  latent_source="noise", samples_per_prompt=2, batch_size=4, num_epochs=2, lr=1e-3, ema_decay=0.9,
                  progress=False, save_samples=False, cache_dir=str(tmp_path / "cache"))
    streamed = distill(output_dir=str(tmp_path / "streamed"), **common)
    monkeypatch.setattr(wandistiller.loops, "stream_target_cache",
                        lambda *args: wandistiller.cache.load_target_cache(*args)[0])
    memory = distill(output_dir=str(tmp_path / "memory"), **common)
    assert streamed.steps == memory.steps == 2 * 24 // 4
    assert _losses(streamed.metrics_path) == _losses(memory.metrics_path)
    assert_same_final_state(streamed.output_dir, memory.output_dir)


def test_feature_distillation_trains_adapters(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:4]), encoding="utf-8")
    result = distill(data_path=str(prompts), output_dir=str(tmp_path / "feat"), student_config=SMALL,
                     teacher_targets="online", latent_source="noise", samples_per_prompt=2, batch_size=4,
                     feature_weight=0.5, max_steps=4, progress=False, save_samples=False)
    assert all(m["feature"] > 0 for m in result.metrics)
    # the adapters were trained with the student: every one of their tensors moved from its initial value
    from wandistiller.loss import FeatureAdapters

    state = torch.load(result.checkpoints[-1] / "training_state.pt", weights_only=True)
    pairing = state["feature_pairing"]
    initial = FeatureAdapters(16, 32, len(pairing["depth_map"]), channels=pairing["channels"]).state_dict()
    assert set(state["loss_fn"]) == {f"adapters.{name}" for name in initial}
    for name, value in initial.items():
        assert not torch.equal(state["loss_fn"][f"adapters.{name}"], value), f"adapter {name} was never updated"
    with pytest.raises(ValueError, match="teacher_targets='online'"):
        distill(output_dir=str(tmp_path / "bad"), feature_weight=0.5)


def test_unknown_parameter_and_indivisible_batch_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown distill parameter"):
        distill(output_dir=str(tmp_path), num_epoch=3)
    from wandistiller.loops import _check

    with pytest.raises(ValueError, match="global batch"):
        _check(DistillConfig(batch_size=3), world_size=2)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:4]), encoding="utf-8")
    common = dict(data_path=str(prompts), student_config=SMALL, student_init="random", batch_size=4,
                  checkpoint_interval=2, progress=False, save_samples=False, output_dir=str(tmp_path / "run"))
    distill(max_steps=4, **common)
    before = list_checkpoints(tmp_path / "run")
    shard = tmp_path / "run" / "cache" / "shard_00000.safetensors"
    tensors = load_file(shard)
    tensors["velocity"][:] = float("nan")  # a corrupted teacher target
    save_file(tensors, shard)
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 5 "):
        distill(max_steps=8, resume=True, **common)
    after = list_checkpoints(tmp_path / "run")
    assert after[-1].name >= before[-1].name
    WanLiteTransformer2DModel.from_pretrained(after[-1] / "student")  # complete and loadable


def _cli(*args):
    return [sys.executable, "-m", "wandistiller", "distill", *args]


def _cli_inputs(tmp_path) -> list[str]:
    """Flags for a small CLI run: 8 prompts, the small student, 4-step trajectories, quiet."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:8]), encoding="utf-8")
    config = tmp_path / "student.json"
    config.write_text(json.dumps(SMALL))
    return ["--data_path", str(prompts), "--student_config", str(config), "--num_inference_steps", "4",
            "--no-progress", "--no-save_samples"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_match_one_process_and_write_each_checkpoint_once(tmp_path):
    args = [*_cli_inputs(tmp_path), "--batch_size", "8", "--num_epochs", "2", "--lr", "1e-3",
            "--checkpoint_interval", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(_cli("--output_dir", str(tmp_path / "one"), *args), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "wandistiller", "distill", "--distributed", "--output_dir", str(tmp_path / "two"), *args]
    multi = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    print("1 process", [round(x, 5) for x in one])
    print("2 ranks  ", [round(x, 5) for x in two])
    assert len(one) == len(two) == 8
    assert two == pytest.approx(one, rel=1e-4)
    names = [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()]
    assert sorted(names) == ["step_0000004", "step_0000008"]  # once each, no temporaries left behind
    assert multi.stdout.count("student saved to") == 1
    # both ranks trained the same weights as the single process
    w1 = load_file(tmp_path / "one" / "student" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "two" / "student" / "diffusion_pytorch_model.safetensors")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    args = [*_cli_inputs(tmp_path), "--batch_size", "4", "--num_epochs", "40", "--lr", "1e-3",
            "--checkpoint_interval", "10", "--keep_checkpoints", "2", "--cache_dir", str(tmp_path / "cache")]
    reference = subprocess.run(_cli("--output_dir", str(tmp_path / "ref"), *args, "--max_steps", "60"),
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("--output_dir", str(run), *args, "--max_steps", "60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step_0000020").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(run)[-1]
    assert killed_at.name < "step_0000060", "the run finished before it could be killed"
    resumed = subprocess.run(_cli("--output_dir", str(run), *args, "--max_steps", "60", "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(tmp_path / "ref" / "metrics.jsonl"), _losses(run / "metrics.jsonl")
    assert len(b) == 60
    assert b == a
    assert_same_final_state(tmp_path / "ref", run)
    for checkpoint in list_checkpoints(run):
        WanLiteTransformer2DModel.from_pretrained(checkpoint / "student")
        torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert not list((run / "checkpoints").glob(".tmp_*"))


def assert_same(a, b, where="state"):
    """Equal bit for bit: tensors with atol=0, containers element by element, everything else with ==."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final_state(a: Path, b: Path) -> None:
    """Two runs end in the same state: last checkpoint (student, optimiser, schedule, EMA, adapters, data position,
    RNG) and the exported student and EMA student, bit for bit."""
    last_a, last_b = list_checkpoints(a)[-1], list_checkpoints(b)[-1]
    assert last_a.name == last_b.name
    assert_same(torch.load(last_a / "training_state.pt", weights_only=True),
                torch.load(last_b / "training_state.pt", weights_only=True), "training_state")
    for folder in (Path("checkpoints") / last_a.name / "student", Path("student"), Path("student_ema")):
        weights = folder / "diffusion_pytorch_model.safetensors"
        assert_same(load_file(a / weights), load_file(b / weights), str(folder))


class _Interrupted(Exception):
    pass


class _StopAtStep(Callback):
    """A callback that interrupts the run at one step, after the step and before its checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, record):
        if step == self.step:
            raise _Interrupted(f"stopped at step {step}")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> dict:
    """Parameters of a short cached run: 2 prompts x 3 noise samples = 6 targets, batch 2, two epochs (6 steps),
    a checkpoint every step, EMA on, from a saved random student; the targets are built once by the first run."""
    root = tmp_path_factory.mktemp("short_run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:2]), encoding="utf-8")
    init = root / "init"
    WanLiteTransformer2DModel.from_student_config(SMALL, TINY_EXPERT, seed=0).save_pretrained(init)
    return dict(data_path=str(prompts), student_config=SMALL, student_init=str(init), latent_source="noise",
                samples_per_prompt=3, batch_size=2, num_epochs=2, lr=1e-3, ema_decay=0.9, cfg_distill=False,
                checkpoint_interval=1, keep_checkpoints=100, cache_dir=str(root / "cache"), progress=False,
                save_samples=False)


class _Recorder:
    """A callback with every hook, written without subclassing Callback: it records what distill() tells it."""

    def __init__(self):
        self.events = []

    def on_step(self, step, metrics):
        self.events.append(("step", step, metrics))

    def on_checkpoint(self, step, path):
        self.events.append(("checkpoint", step, path))

    def on_samples(self, epoch, rows, prompts):
        self.events.append(("samples", epoch, rows, prompts))

    def on_end(self, result):
        self.events.append(("end", result))


@pytest.fixture(scope="module")
def short_recorder():
    return _Recorder()


@pytest.fixture(scope="module")
def short_reference(short_run, short_recorder, tmp_path_factory):
    return distill(output_dir=str(tmp_path_factory.mktemp("short_reference") / "run"), callbacks=[short_recorder],
                   **short_run)


def test_callbacks_hear_every_step_checkpoint_and_the_end(short_reference, short_recorder):
    steps = [e for e in short_recorder.events if e[0] == "step"]
    assert [metrics for _, _, metrics in steps] == short_reference.metrics
    assert [step for _, step, _ in steps] == list(range(1, 7))
    saved = [(step, path) for kind, step, path in (e for e in short_recorder.events if e[0] == "checkpoint")]
    assert saved == [(s, c) for s, c in zip(range(1, 7), short_reference.checkpoints)]
    assert short_recorder.events[-1] == ("end", short_reference)
    kinds = [e[0] for e in short_recorder.events]
    assert kinds == ["step", "checkpoint"] * 6 + ["end"]  # save_samples=False: no samples


def test_a_callback_without_every_hook_is_refused_before_any_work(tmp_path):
    class OnlySteps:
        def on_step(self, step, metrics):
            pass

    with pytest.raises(ValueError, match=r"^callback OnlySteps has no on_checkpoint, on_samples, on_end: subclass "
                                         r"wandistiller.Callback"):
        distill(output_dir=str(tmp_path / "run"), callbacks=[OnlySteps()])
    assert not (tmp_path / "run").exists()


def test_distill_is_the_plain_training_loop_it_describes(short_run, short_reference):
    """distill()'s stages written out as one plain loop (cache, initial student, AdamW, warm-up + cosine schedule,
    clipping, EMA, the sampler's epochs) give its losses, student and EMA bit for bit: a refactoring of the loop
    that changed what it computes fails here."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from wandistiller.loss import DistillLoss
    from wandistiller.teacher import read_teacher_info

    run, defaults = short_run, DistillConfig()
    spec = TargetSpec(latent_source="noise", samples_per_prompt=run["samples_per_prompt"], height=64, width=64,
                      velocity="conditional")  # the target cfg_distill=False trains on
    targets, _ = load_target_cache(run["cache_dir"], read_teacher_info("tiny").fingerprint(), spec,
                                   read_prompts(run["data_path"]))
    student = WanLiteTransformer2DModel.from_pretrained(run["student_init"]).train()
    loss_fn = DistillLoss(cfg_distill=run["cfg_distill"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=run["lr"], weight_decay=defaults.weight_decay)
    sampler = torch.utils.data.DistributedSampler(targets, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    loader = torch.utils.data.DataLoader(targets, batch_size=run["batch_size"], sampler=sampler, drop_last=True)
    total = run["num_epochs"] * len(loader)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(defaults.warmup_steps, total), total)
    ema = EMAModel(student.parameters(), decay=run["ema_decay"], foreach=True)
    torch.manual_seed(defaults.seed)
    losses = []
    for epoch in range(run["num_epochs"]):
        sampler.set_epoch(epoch)
        for batch in loader:
            pred = student(batch["latents"], batch["timesteps"], targets.prompt_embeds[batch["prompt_index"]]).sample
            loss = loss_fn(pred.float(), batch["velocity"], timestep=batch["timesteps"])["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), defaults.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(student.parameters())
            losses.append(loss.item())
    assert losses == [m["loss"] for m in short_reference.metrics]
    weights = load_file(short_reference.student_path / "diffusion_pytorch_model.safetensors")
    assert_same(weights, {name: p.detach() for name, p in student.named_parameters()}, "student")
    ema.copy_to(student.parameters())
    weights = load_file(short_reference.ema_path / "diffusion_pytorch_model.safetensors")
    assert_same(weights, {name: p.detach() for name, p in student.named_parameters()}, "student_ema")


def test_the_ema_is_the_running_average_of_every_step(short_run, short_reference):
    from diffusers.training_utils import EMAModel

    assert [c.name for c in short_reference.checkpoints] == [f"step_{s:07d}" for s in range(1, 7)]
    replay = WanLiteTransformer2DModel.from_pretrained(short_run["student_init"])
    ema = EMAModel(replay.parameters(), decay=short_run["ema_decay"], foreach=True)
    for checkpoint in short_reference.checkpoints:  # the student after each step
        ema.step(WanLiteTransformer2DModel.from_pretrained(checkpoint / "student").parameters())
    ema.copy_to(replay.parameters())
    saved = load_file(short_reference.ema_path / "diffusion_pytorch_model.safetensors")
    assert_same(saved, {name: p.detach() for name, p in replay.named_parameters()}, "student_ema")
    last = load_file(short_reference.student_path / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[name], last[name]) for name in saved)  # an average, not the last weights


def test_an_interrupted_run_resumes_to_the_same_state_bit_for_bit(short_run, short_reference, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(_Interrupted):
        distill(output_dir=out, callbacks=[_StopAtStep(5)], **short_run)
    assert list_checkpoints(out)[-1].name == "step_0000004"  # mid-epoch: the data position must come back too
    resumed = distill(output_dir=out, resume=True, **short_run)
    assert resumed.steps == 6
    assert _losses(resumed.metrics_path) == _losses(short_reference.metrics_path)
    assert_same_final_state(short_reference.output_dir, Path(out))


def _first_step_loss(run: dict, cache_dir, velocity: str) -> float:
    """The loss of the first step, computed here from the initial student and the cached targets (the `velocity`
    the cache keeps), on the batch the loop draws first (its sampler, seed 0, epoch 0)."""
    from wandistiller.teacher import read_teacher_info

    prompts = read_prompts(run["data_path"])
    spec = TargetSpec(latent_source="noise", samples_per_prompt=run["samples_per_prompt"], height=64, width=64,
                      velocity=velocity)
    targets, _ = load_target_cache(cache_dir, read_teacher_info("tiny").fingerprint(), spec, prompts)
    sampler = torch.utils.data.DistributedSampler(targets, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(targets, batch_size=run["batch_size"], sampler=sampler, drop_last=True)
    batch = next(iter(loader))
    student = WanLiteTransformer2DModel.from_pretrained(run["student_init"]).train()
    with torch.no_grad():
        pred = student(batch["latents"], batch["timesteps"], targets.prompt_embeds[batch["prompt_index"]]).sample
    return float((pred.float() - batch["velocity"]).pow(2).flatten(1).mean(1).mean())  # as loss.velocity_loss reduces


def test_cfg_distill_chooses_the_guided_or_the_conditional_target(short_run, short_reference, tmp_path):
    """Each keeps its own velocity in the cache; a cache of the other is refused, never trained on."""
    guided_cache = tmp_path / "guided_cache"
    with pytest.raises(ValueError, match=r"other target settings \(velocity: 'conditional' in the cache, 'guided'"):
        distill(output_dir=str(tmp_path / "refused"), **{**short_run, "cfg_distill": True})
    run = distill(output_dir=str(tmp_path / "guided"), **{**short_run, "cfg_distill": True, "max_steps": 1,
                                                          "cache_dir": str(guided_cache)})
    conditional = _first_step_loss(short_run, short_run["cache_dir"], "conditional")
    guided = _first_step_loss(short_run, guided_cache, "guided")
    print(f"first-step loss: conditional target {conditional:.8g}, guided target {guided:.8g}")
    assert conditional != guided
    assert short_reference.metrics[0]["loss"] == conditional  # the reference runs with cfg_distill=False
    assert run.metrics[0]["loss"] == guided


def test_an_earlier_run_is_never_replaced_silently(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:2]), encoding="utf-8")
    common = dict(data_path=str(prompts), student_config=SMALL, student_init="random", batch_size=4, max_steps=2,
                  progress=False, save_samples=False, output_dir=str(tmp_path / "run"))
    first = distill(**common)
    weights = first.student_path / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="resume=True to continue it, overwrite=True to replace it"):
        distill(**common, lr=5e-2)
    assert weights.read_bytes() == before
    replaced = distill(**common, lr=5e-2, overwrite=True)
    assert replaced.steps == 2 and weights.read_bytes() != before
    assert (tmp_path / "run" / "cache" / "manifest.json").is_file()  # the targets were kept and reused


def test_distributed_without_torchrun_says_how_to_launch(tmp_path, monkeypatch, capsys):
    from wandistiller.cli import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert main(["distill", "--distributed", "--output_dir", str(tmp_path / "run")]) == 2
    assert "torchrun --nproc_per_node=N -m wandistiller distill" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["distill", "--output_dir", str(tmp_path / "run")]) == 2
    assert "MASTER_ADDR is not" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _prompts_file(tmp_path, n: int) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(read_prompts()[:n]), encoding="utf-8")
    return str(path)


def test_resumed_ema_lives_on_the_training_device(tmp_path):
    from diffusers.training_utils import EMAModel

    from wandistiller.loops import _restore_training_state, _training_state
    from wandistiller.loss import DistillLoss

    student = WanLiteTransformer2DModel.from_student_config(SMALL, TINY_EXPERT, seed=0)
    optimizer = torch.optim.AdamW(student.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMAModel(student.parameters(), decay=0.9)
    ema.step(student.parameters())
    torch.save(_training_state(optimizer, schedule, ema, DistillLoss(), None, 3, 0, 3), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)  # as a resume reads it
    resumed = EMAModel(student.parameters(), decay=0.9)
    # "meta" stands in for the GPU a resumed run trains on: the shadow weights must follow the training device
    step = _restore_training_state(state, optimizer, schedule, resumed, DistillLoss(), torch.device("meta"))
    assert step == (3, 0, 3)
    assert {p.device.type for p in resumed.shadow_params} == {"meta"}
    assert resumed.optimization_step == ema.optimization_step


def test_a_second_teacher_in_the_same_folder_never_reuses_the_first_ones_targets(tmp_path):
    prompts = _prompts_file(tmp_path, 2)
    common = dict(data_path=prompts, student_config=SMALL, student_init="random", latent_source="noise",
                  samples_per_prompt=2, batch_size=4, max_steps=1, progress=False, save_samples=False,
                  output_dir=str(tmp_path / "run"), cache_dtype="float32")
    distill(teacher_path="tiny", **common)
    cache = tmp_path / "run" / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    with pytest.raises(ValueError, match="made with other teacher: pass overwrite=True to discard it"):
        distill(teacher_path="tiny-2.1", resume=True, **common)
    assert json.loads((cache / "manifest.json").read_text()) == manifest  # refused, untouched
    distill(teacher_path="tiny-2.1", overwrite=True, **common)
    from wandistiller.teacher import load_teacher, read_teacher_info

    second = load_teacher("tiny-2.1", device_strategy="cpu")
    assert second.fingerprint == read_teacher_info("tiny-2.1").fingerprint() != read_teacher_info("tiny").fingerprint()
    spec = TargetSpec(latent_source="noise", samples_per_prompt=2, height=64, width=64, dtype="float32")
    targets, _ = load_target_cache(cache, second.fingerprint, spec, read_prompts(prompts))
    t = targets.tensors
    embeds = targets.prompt_embeds[t["prompt_index"]]
    negative = targets.negative_embeds.expand(len(embeds), -1, -1)
    v = second.velocity(t["latents"][:, :, None], t["timesteps"], embeds, negative)[:, :, 0]
    torch.testing.assert_close(t["velocity"], v, rtol=0, atol=1e-5)  # the second teacher's own (guided) targets
    with pytest.raises(ValueError, match="made with other teacher"):
        load_target_cache(cache, read_teacher_info("tiny").fingerprint(), spec, read_prompts(prompts))


def _refuse_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the configuration was checked")

    monkeypatch.setattr(wandistiller.teacher, "load_teacher", refuse)


@pytest.mark.parametrize("params, message", [
    (dict(student_config={**SMALL, "num_channels": 48}), "num_channels=48 contradicts the teacher"),
    (dict(student_config={**SMALL, "hidden_size": 64, "num_heads": 4}), "num_attention_heads=4 exceeds the teacher's 2"),
    (dict(projection_layers=[0, 9]), "teacher block"),
    (dict(projection_expert="middle"), "unknown projection_expert 'middle'"),
    (dict(height=60, width=64), "image height 60 does not suit this teacher: use a multiple of 16"),
    (dict(student_config={**SMALL, "image_size": 1024}), "image height 1024 .* of at most 512 px"),
    (dict(student_config={k: v for k, v in SMALL.items() if k != "image_size"}), "student config sets no image_size"),
    (dict(latent_source="images", images_path="/no/such/folder"), "images_path /no/such/folder is not a folder"),
])
def test_config_errors_stop_before_the_teacher_is_loaded(tmp_path, monkeypatch, params, message):
    _refuse_teacher(monkeypatch)
    common = dict(data_path=_prompts_file(tmp_path, 2), student_config=SMALL, progress=False,
                  output_dir=str(tmp_path / "run"))
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        distill(**{**common, **params})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_broken_student_config_file_names_the_file_and_position(tmp_path, monkeypatch):
    _refuse_teacher(monkeypatch)
    config = tmp_path / "student.json"
    config.write_text('{"hidden_size": 16,\n "depth": 2,\n "num_heads": 1\n "image_size": 64}')
    with pytest.raises(ValueError, match=f"{config} is corrupt: not valid JSON at line 4, column 2"):
        distill(data_path=_prompts_file(tmp_path, 2), student_config=str(config), output_dir=str(tmp_path / "run"))


@pytest.mark.slow
def test_feature_kd_on_two_ranks_matches_one_process(tmp_path):
    args = [*_cli_inputs(tmp_path), "--teacher_targets", "online", "--latent_source", "noise", "--samples_per_prompt",
            "2", "--feature_weight", "1", "--projection_layers", "first_last", "--max_grad_norm", "0.05",
            "--batch_size", "8", "--num_epochs", "2", "--lr", "1e-3", "--checkpoint_interval", "4", "--ema_decay", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(_cli("--output_dir", str(tmp_path / "one"), *args), env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "wandistiller", "distill", "--distributed", "--output_dir", str(tmp_path / "two"), *args]
    multi = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    print("1 process", one, "\n2 ranks  ", two)
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-4)
    states = [torch.load(tmp_path / run / "checkpoints" / "step_0000004" / "training_state.pt", weights_only=True)
              for run in ("one", "two")]
    assert states[0]["feature_pairing"] == states[1]["feature_pairing"]
    assert states[0]["feature_pairing"]["depth_map"] == [0, 3]
    weights = [{**load_file(tmp_path / run / "student" / "diffusion_pytorch_model.safetensors"),
                **{f"adapter.{k}": v for k, v in state["loss_fn"].items()}} for run, state in zip(("one", "two"), states)]
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    print("largest weight difference, 2 ranks vs 1 process:", worst)
    for key in weights[0]:  # tolerance: reduction order only
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    args = [*_cli_inputs(tmp_path), "--student_init", "random", "--batch_size", "8", "--num_epochs", "8",
            "--checkpoint_interval", "2", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                   "-m", "wandistiller", "distill", "--distributed", *args, *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)

    first = torchrun("--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    shard = tmp_path / "cache" / "shard_00000.safetensors"
    tensors = load_file(shard)
    tensors["velocity"][5] = float("nan")  # one corrupted target: one rank sees it, the other does not
    save_file(tensors, shard)
    failed = torchrun("--max_steps", "32", "--resume")
    assert failed.returncode != 0
    # both ranks report, with the same message (their two stderr writes may interleave on one line)
    messages = re.findall(r"wandistiller: error: non-finite loss at step \d+ \(on rank [\d, ]+ of 2\)", failed.stderr)
    print(messages)
    assert len(messages) == 2 and messages[0] == messages[1], failed.stderr[-3000:]
    last = list_checkpoints(tmp_path / "run")[-1]
    WanLiteTransformer2DModel.from_pretrained(last / "student")  # the last good checkpoint is intact
    torch.load(last / "training_state.pt", weights_only=True)


_SHARED_TEACHER_RANK = """
import os, sys
import wandistiller.teacher as teacher
from wandistiller.loops import distill

# Stand-in for gpu0 under torchrun on a GPU machine: one teacher for both ranks, held by local rank 0.
local_rank = int(os.environ["LOCAL_RANK"])
teacher.teacher_device_plan = lambda *a, **k: teacher.DevicePlan("cpu", shared=True, loads_teacher=local_rank == 0)
real_load = teacher.load_teacher

def counting_load(*args, **kwargs):
    open(os.path.join(sys.argv[1], f"teacher_loaded_by_rank_{local_rank}"), "a").write("x")
    return real_load(*args, **kwargs)

teacher.load_teacher = counting_load
distill(data_path=sys.argv[2], output_dir=sys.argv[3], student_config={"hidden_size": 16, "depth": 2, "num_heads": 1,
        "image_size": 64}, num_inference_steps=4, batch_size=8, max_steps=2, progress=False, save_samples=False)
"""


@pytest.mark.slow
def test_a_shared_teacher_is_loaded_by_rank_0_only(tmp_path):
    prompts = _prompts_file(tmp_path, 8)
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", _SHARED_TEACHER_RANK, str(tmp_path), prompts, str(tmp_path / "run")],
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [proc.communicate(timeout=900)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert sorted(p.name for p in tmp_path.glob("teacher_loaded_by_rank_*")) == ["teacher_loaded_by_rank_0"]
    manifest = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())
    assert sum(shard["count"] for shard in manifest["shards"]) == 8 * 4  # rank 0 recorded every prompt
    assert len(_losses(tmp_path / "run" / "metrics.jsonl")) == 2
