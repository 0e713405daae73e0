"""The teacher target cache (wandistiller.cache): resumable, split across ranks, tied to teacher, spec and prompts;
compact (prompt embeddings once, cut to their true length; one velocity; bf16)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from wandistiller.cache import (
    CACHE_FORMAT, build_target_cache, cache_bytes_per_prompt, load_target_cache, open_target_cache,
)
from wandistiller.data import TargetSpec
from wandistiller.flow import guided_velocity
from wandistiller.teacher import load_teacher

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen"]
# What a shard holds per target: the point, its prompt and trajectory, and the teacher's answer there (what the loop
# trains on: with cfg_distill the guided velocity alone); per trajectory (TargetSet.trajectories) it also holds the
# final latents, reflow's pairs.
SHARD_KEYS = {"latents", "timesteps", "prompt_index", "trajectory", "velocity", "guidance"}


@pytest.fixture()
def lazy_teacher():
    return load_teacher("tiny", device_strategy="cpu", load_experts=False)


def test_cache_is_resumable_split_by_rank_and_refuses_other_settings(lazy_teacher, tmp_path):
    spec = TargetSpec(num_inference_steps=4, shard_prompts=1)
    cache = tmp_path / "cache"
    # "rank 1 of 2" writes its shard only; then rank 0 completes the rest and the manifest
    build_target_cache(lazy_teacher, PROMPTS, cache, spec, rank=1, world_size=2, progress=False)
    assert sorted(p.name for p in cache.glob("shard_*")) == ["shard_00001.safetensors"]
    assert not (cache / "manifest.json").exists()
    shard1 = (cache / "shard_00001.safetensors").stat().st_mtime_ns
    build_target_cache(lazy_teacher, PROMPTS, cache, spec, rank=0, world_size=1, progress=False)
    assert (cache / "shard_00001.safetensors").stat().st_mtime_ns == shard1, "a finished shard is not redone"
    targets, manifest = load_target_cache(cache, lazy_teacher.fingerprint, spec, PROMPTS)
    assert len(targets) == 3 * 4 and set(targets.tensors) == SHARD_KEYS
    assert manifest["teacher_fingerprint"] and manifest["prompts"] == PROMPTS
    assert targets.prompt_embeds.shape == (3, 512, 32)
    # a single-process build gives the very same targets
    whole = tmp_path / "whole"
    build_target_cache(lazy_teacher, PROMPTS, whole, spec, progress=False)
    same, _ = load_target_cache(whole, lazy_teacher.fingerprint, spec, PROMPTS)
    for key in targets.tensors:  # reduction order (other batches) only, which may move a bf16 value by one step
        torch.testing.assert_close(targets.tensors[key], same.tensors[key], rtol=2**-7, atol=1e-5)
    with pytest.raises(ValueError, match="made with other prompts: pass overwrite=True"):
        build_target_cache(lazy_teacher, PROMPTS[:2], cache, spec, progress=False)
    with pytest.raises(ValueError, match=r"other target settings \(dtype: 'bfloat16' in the cache, 'float32' wanted\)"):
        load_target_cache(cache, lazy_teacher.fingerprint, TargetSpec(num_inference_steps=4, shard_prompts=1,
                                                                      dtype="float32"), PROMPTS)
    assert json.loads((cache / "manifest.json").read_text())["prompts"] == PROMPTS


def test_prompt_embeddings_are_stored_once_at_their_true_length_and_come_back_exactly(lazy_teacher, tmp_path):
    spec = TargetSpec(num_inference_steps=2, shard_prompts=2)
    build_target_cache(lazy_teacher, PROMPTS, tmp_path / "cache", spec, progress=False)
    targets, manifest = load_target_cache(tmp_path / "cache", lazy_teacher.fingerprint, spec, PROMPTS)
    embeds, negative = lazy_teacher.encode_prompts(PROMPTS, negative="")
    torch.testing.assert_close(targets.prompt_embeds, embeds, rtol=0, atol=0)  # WanPipeline's padded tensors
    torch.testing.assert_close(targets.negative_embeds, negative[:1], rtol=0, atol=0)
    # on disk: each prompt once, its true tokens only (the tokenizer's count, end-of-text included)
    tokenizer = lazy_teacher.pipe.tokenizer
    true_lengths = [int(tokenizer(p, max_length=512, truncation=True).attention_mask.count(1)) for p in PROMPTS]
    stored = [load_file(tmp_path / "cache" / s["text"]) for s in manifest["shards"]]
    assert torch.cat([s["lengths"] for s in stored]).tolist() == true_lengths
    assert sum(len(s["tokens"]) for s in stored) == sum(true_lengths) < 512
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [
        "negative_embeds.safetensors", "shard_00000.safetensors", "shard_00001.safetensors",
        "text_00000.safetensors", "text_00001.safetensors"]


def test_the_kept_velocity_and_dtype_are_the_full_answers_rounded(lazy_teacher, tmp_path):
    """One cache with v_cond and v_uncond in float32, others with one velocity in bf16 or float32: the same
    targets, reduced exactly as the loss reduces them (flow.guided_velocity), then rounded to the cache dtype."""
    full_spec = TargetSpec(num_inference_steps=4, velocity="both", dtype="float32")
    build_target_cache(lazy_teacher, PROMPTS, tmp_path / "full", full_spec, progress=False)
    full = load_target_cache(tmp_path / "full", lazy_teacher.fingerprint, full_spec, PROMPTS)[0].tensors
    guided = guided_velocity(full["v_cond"], full["v_uncond"], full["guidance"])
    for velocity, dtype, expected in (("guided", "bfloat16", guided), ("conditional", "bfloat16", full["v_cond"]),
                                      ("guided", "float32", guided)):
        spec = TargetSpec(num_inference_steps=4, velocity=velocity, dtype=dtype)
        build_target_cache(lazy_teacher, PROMPTS, tmp_path / f"{velocity}-{dtype}", spec, progress=False)
        shard = load_file(tmp_path / f"{velocity}-{dtype}" / "shard_00000.safetensors")
        assert set(shard) == SHARD_KEYS | {"final_latents", "final_prompt_index"}
        assert shard["velocity"].dtype == shard["latents"].dtype == shard["final_latents"].dtype == getattr(torch, dtype)
        assert shard["timesteps"].dtype == torch.float32 and torch.equal(shard["timesteps"], full["timesteps"])
        torch.testing.assert_close(shard["velocity"], expected.to(getattr(torch, dtype)), rtol=0, atol=0)
        torch.testing.assert_close(shard["latents"], full["latents"].to(getattr(torch, dtype)), rtol=0, atol=0)
    assert not torch.equal(guided, full["v_cond"])


def test_steps_per_trajectory_keeps_evenly_spread_steps_of_both_experts(lazy_teacher, tmp_path):
    full_spec = TargetSpec(num_inference_steps=8, dtype="float32")
    some_spec = TargetSpec(num_inference_steps=8, dtype="float32", steps_per_trajectory=3)
    assert some_spec.kept_steps() == [0, 4, 7]  # round(linspace(0, 7, 3)): the first and the last, one between
    for name, spec in (("full", full_spec), ("some", some_spec)):
        build_target_cache(lazy_teacher, PROMPTS, tmp_path / name, spec, progress=False)
    full, some = (load_target_cache(tmp_path / name, lazy_teacher.fingerprint, spec, PROMPTS)[0]
                  for name, spec in (("full", full_spec), ("some", some_spec)))
    assert len(some) == 3 * 3 and len(full) == 3 * 8
    times = full.tensors["timesteps"][full.tensors["prompt_index"] == 0]
    steps = sorted(set(times.tolist()), reverse=True)  # the sampler's timesteps, first to last
    kept = [steps[i] for i in some_spec.kept_steps()]
    assert sorted(set(some.tensors["timesteps"].tolist()), reverse=True) == kept
    assert kept[0] >= lazy_teacher.boundary_timestep > kept[-1]  # both experts
    # the kept records are the full trajectory's own, and the sampler still ran every step: same final latents
    for row in range(len(some)):
        match = ((full.tensors["timesteps"] == some.tensors["timesteps"][row])
                 & (full.tensors["trajectory"] == some.tensors["trajectory"][row]))
        torch.testing.assert_close(full.tensors["velocity"][match][0], some.tensors["velocity"][row], rtol=0, atol=0)
    torch.testing.assert_close(full.trajectories["final_latents"], some.trajectories["final_latents"], rtol=0, atol=0)
    assert torch.equal(full.reflow_pairs()[0], some.reflow_pairs()[0])  # the first step (the noise) is always kept
    for bad in (1, 9):
        with pytest.raises(ValueError, match=f"steps_per_trajectory={bad} must be a whole number from 2"):
            TargetSpec(num_inference_steps=8, steps_per_trajectory=bad)
    with pytest.raises(ValueError, match="applies to latent_source='trajectory' only"):
        TargetSpec(latent_source="noise", steps_per_trajectory=2)


def test_a_cache_of_an_older_format_is_refused_naming_the_fix(lazy_teacher, tmp_path):
    spec = TargetSpec(num_inference_steps=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": 2, "teacher_fingerprint": lazy_teacher.fingerprint}))
    (cache / "shard_00000.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match=rf"^the target cache {cache} is in cache format 2, from another version of "
                                         rf"wandistiller \(this one reads format {CACHE_FORMAT}\): pass overwrite=True"):
        open_target_cache(cache, lazy_teacher.fingerprint, spec, PROMPTS)
    assert open_target_cache(cache, lazy_teacher.fingerprint, spec, PROMPTS, discard_mismatch=True) == "empty"
    assert not list(cache.iterdir())


def test_bytes_per_prompt_at_the_tiny_defaults_are_what_the_cache_takes(lazy_teacher, tmp_path):
    """cache_bytes_per_prompt (what plan and the benchmark print) against the files a recording writes."""
    spec = TargetSpec()
    sizes = {}
    for n in (1, 3):
        build_target_cache(lazy_teacher, PROMPTS[:n], tmp_path / str(n), spec, progress=False)
        sizes[n] = sum(f.stat().st_size for f in (tmp_path / str(n)).glob("*.safetensors"))
    tokens = float(load_file(tmp_path / "3" / "text_00000.safetensors")["lengths"][1:].float().mean())
    computed = cache_bytes_per_prompt(spec, latent_channels=16, latent_hw=(8, 8), text_dim=32, text_tokens=tokens)
    assert computed == pytest.approx((sizes[3] - sizes[1]) / 2, rel=0.05)


def test_streamed_records_are_the_in_memory_ones(lazy_teacher, tmp_path):
    """TargetShards (read from disk record by record) gives for every index what load_target_cache (all in memory)
    gives: the record, its prompt's re-padded embeddings, its trajectory's reflow pair, bit for bit."""
    from wandistiller.cache import TargetShards, stream_target_cache

    prompts = PROMPTS + ["a paper boat on a pond", "a snowy mountain village"]
    spec = TargetSpec(num_inference_steps=3, trajectories_per_prompt=2, shard_prompts=2)
    build_target_cache(lazy_teacher, prompts, tmp_path / "cache", spec, progress=False)
    memory, manifest = load_target_cache(tmp_path / "cache", lazy_teacher.fingerprint, spec, prompts)
    streamed = stream_target_cache(tmp_path / "cache", lazy_teacher.fingerprint, spec, prompts)
    assert isinstance(streamed, TargetShards) and len(streamed) == len(memory) == 5 * 2 * 3
    assert streamed.shard_sizes == memory.shard_sizes == [12, 12, 6]
    for index in range(len(memory)):
        a, b = memory[index], streamed[index]
        assert set(a) == set(b) == {*SHARD_KEYS, "prompt_embeds"}
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m: f"record {index}, {key}: {m}")
    torch.testing.assert_close(streamed.embeddings([4, 0, 2]), memory.prompt_embeds[[4, 0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(streamed.negative_embeds, memory.negative_embeds, rtol=0, atol=0)
    trajectories = torch.tensor([9, 0, 5, 4, 1])
    for got, expected in zip(streamed.reflow_pairs(trajectories), memory.reflow_pairs(trajectories)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="holds no complete target cache"):
        stream_target_cache(tmp_path / "none", lazy_teacher.fingerprint, spec, prompts)


def test_shard_aware_order_is_exact_under_ranks_and_resume():
    from wandistiller.cache import ShardedShuffleSampler

    sizes = [7, 5, 6, 3, 4, 8, 2, 5, 6, 1]
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    shard_of = {i: k for k in range(len(sizes)) for i in range(starts[k], starts[k + 1])}
    one = ShardedShuffleSampler(sizes, seed=3, window=3)
    orders = [one.order(epoch) for epoch in range(3)]
    for order in orders:  # every record once, in runs that each hold every record of at most 3 shards
        assert sorted(order.tolist()) == list(range(sum(sizes)))
        shards, position = [shard_of[i] for i in order.tolist()], 0
        while position < len(shards):
            left = {}
            while True:
                k = shards[position]
                if k not in left:
                    assert len(left) < 3, f"records of a 4th shard inside a window at position {position}"
                    left[k] = sizes[k]
                left[k] -= 1
                position += 1
                if not any(left.values()) and (len(left) == 3 or position == len(shards)):
                    break
    assert not torch.equal(orders[0], orders[1])
    # two or three ranks together read, batch after batch, what one process reads
    for world in (2, 3):
        ranks = [ShardedShuffleSampler(sizes, num_replicas=world, rank=r, seed=3, window=3) for r in range(world)]
        for sampler in ranks:
            sampler.set_epoch(1)
        dealt = [list(sampler) for sampler in ranks]
        assert all(len(d) == len(ranks[0]) == sum(sizes) // world for d in dealt)
        interleaved = [dealt[r][i] for i in range(len(dealt[0])) for r in range(world)]
        assert interleaved == orders[1][:len(interleaved)].tolist()
        # resuming at this rank's 5th record reads the rest of what the uninterrupted epoch reads
        ranks[1].set_epoch(1, start=5)
        assert list(ranks[1]) == dealt[1][5:]
    # a cache of one window: DistributedSampler's order, to the index
    reference = torch.utils.data.DistributedSampler(range(sum(sizes[:3])), num_replicas=2, rank=1, shuffle=True,
                                                    seed=3, drop_last=True)
    reference.set_epoch(2)
    mine = ShardedShuffleSampler(sizes[:3], num_replicas=2, rank=1, seed=3)
    mine.set_epoch(2)
    assert list(mine) == list(reference)


def test_a_second_job_writing_the_same_cache_is_refused_and_a_stale_lock_taken_over(lazy_teacher, tmp_path,
                                                                                     monkeypatch):
    import os
    import socket
    import subprocess
    import sys
    import time

    import wandistiller.cache
    from wandistiller.cache import LOCK_STALE_SECONDS, CacheLock

    spec = TargetSpec(num_inference_steps=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / "cache.lock"

    def held_by(host, pid, age=0.0):
        lock.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-11-29 10:00:00"}))
        os.utime(lock, (time.time() - age, time.time() - age))

    refused = rf"^another job \(process {{pid}} on {{host}}, since 2026-11-29 10:00:00\) is writing the target cache " \
              rf"{cache}: wait for it, or choose another cache_dir; if that job is gone, delete {lock}$"
    for host, pid in ((socket.gethostname(), os.getppid()), ("node-7", 1234)):  # alive here; elsewhere, recent
        held_by(host, pid)
        with pytest.raises(RuntimeError, match=refused.format(pid=pid, host=host)):
            build_target_cache(lazy_teacher, PROMPTS, cache, spec, progress=False)
        assert not list(cache.glob("*.safetensors")) and json.loads(lock.read_text())["pid"] == pid  # untouched
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for host, pid, age in ((socket.gethostname(), int(gone.stdout), 0.0), ("node-7", 1234, LOCK_STALE_SECONDS + 5)):
        held_by(host, pid, age)
        with pytest.warns(UserWarning, match=f"taking over the stale lock {lock} of process {pid} on {host}"):
            build_target_cache(lazy_teacher, PROMPTS[:1], cache, spec, progress=False)
        assert (cache / "manifest.json").is_file() and not lock.exists()  # released once the cache is complete
        for file in cache.iterdir():
            file.unlink()
    # while held, the lock is touched: a live job's lock never looks stale
    monkeypatch.setattr(wandistiller.cache, "LOCK_HEARTBEAT_SECONDS", 0.05)
    held = CacheLock.acquire(cache)
    assert CacheLock.acquire(cache) is held  # the same process takes it again freely
    os.utime(lock, (time.time() - 100, time.time() - 100))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 5
    held.release()
    assert not lock.exists()
