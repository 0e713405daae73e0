"""The teacher target cache (wandistiller.cache): resumable, split across ranks, tied to teacher, spec and prompts."""

import json

import pytest
import torch

from wandistiller.cache import build_target_cache, load_target_cache
from wandistiller.data import TargetSpec
from wandistiller.teacher import load_teacher

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen"]
# What a shard holds per target: the point, its prompt and trajectory, and the teacher's answer there (what the loop
# trains on); per trajectory (TargetSet.trajectories) it also holds the final latents, reflow's pairs.
SHARD_KEYS = {"latents", "timesteps", "prompt_index", "trajectory", "v_cond", "v_uncond", "guidance"}


@pytest.fixture()
def lazy_teacher(tmp_path):
    return load_teacher("tiny", device_strategy="cpu", load_experts=False, cache_dir=tmp_path / "embeds")


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
    for key in targets.tensors:
        torch.testing.assert_close(targets.tensors[key], same.tensors[key], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="made with other prompts: pass overwrite=True"):
        build_target_cache(lazy_teacher, PROMPTS[:2], cache, spec, progress=False)
    assert json.loads((cache / "manifest.json").read_text())["prompts"] == PROMPTS
