"""The teacher target cache: teacher velocities at the training points, kept on disk as safetensors shards.

Every reader and writer opens a cache through `open_target_cache`, which checks that it was made with this
teacher (`Teacher.fingerprint`), these target settings (`TargetSpec`) and these prompts. Building is resumable
and split across ranks; `load_target_cache` reads a complete cache without any teacher weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .data import TRAJECTORY_TABLE, TargetSet, TargetSpec, compute_targets, concat_records

# 2: trajectory shards also hold each trajectory's final latents and each record's trajectory id (reflow's pairs)
CACHE_FORMAT = 2


def save_atomically(tensors: dict, path: Path) -> None:
    """Write tensors to a safetensors file that appears complete or not at all (temp name, fsync, rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


CACHE_HEADER = "cache_header.json"  # written when a build starts, so a partial cache is checked too
_HEADER_WORDS = {"format": "cache format", "teacher_fingerprint": "teacher", "spec": "target settings",
                 "prompts_sha256": "prompts"}


def cache_header(teacher_fingerprint: str, spec: TargetSpec, prompts: list[str]) -> dict:
    """What a target cache must have been made with: the teacher (`Teacher.fingerprint`), spec and prompts."""
    return {"format": CACHE_FORMAT, "teacher_fingerprint": teacher_fingerprint, "spec": asdict(spec),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def open_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec, prompts: list[str], *,
                      discard_mismatch: bool = False) -> str:
    """The state of the target cache in `cache_dir` for this teacher, spec and prompts: "complete", "partial"
    (a build was interrupted) or "empty". Every reader and writer of a cache goes through here.

    A cache made with another teacher, spec or prompts (or of unknown origin) raises a ValueError, or with
    `discard_mismatch=True` its target files are deleted and the state is "empty".
    """
    from .teacher import read_json

    cache_dir = Path(cache_dir)
    header = cache_header(teacher_fingerprint, spec, prompts)
    found, state = None, "empty"
    for name, name_state in (("manifest.json", "complete"), (CACHE_HEADER, "partial")):
        if (cache_dir / name).is_file():
            found, state = read_json(cache_dir / name), name_state
            break
    if found is None and not any(cache_dir.glob("shard_*.safetensors")):
        return "empty"
    differs = ["origin unknown"] if found is None else [
        _HEADER_WORDS[key] for key in header if not isinstance(found, dict) or found.get(key) != header[key]]
    if not differs:
        return state
    if not discard_mismatch:
        raise ValueError(f"the target cache {cache_dir} was made with other {', '.join(differs)}: pass overwrite=True "
                         "to discard it, or another cache_dir (the existing one is kept)")
    for path in [cache_dir / "manifest.json", cache_dir / CACHE_HEADER, cache_dir / "prompt_embeds.safetensors",
                 *cache_dir.glob("shard_*.safetensors")]:
        path.unlink(missing_ok=True)
    return "empty"


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same file
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def build_target_cache(teacher, prompts: list[str], cache_dir: str | Path, spec: TargetSpec, *,
                       rank: int = 0, world_size: int = 1, barrier=None, progress=True) -> Path:
    """Write the teacher targets for `prompts` to `cache_dir` (resumable; prompts split across ranks).

    Layout: `prompt_embeds.safetensors` (all prompts + the negative prompt), `shard_NNNNN.safetensors` (targets
    for `spec.shard_prompts` prompts each) and `manifest.json`, written last by rank 0. Finished shards are
    skipped, so an interrupted build continues where it stopped. A cache made with another teacher, spec or
    prompts is refused (see `open_target_cache`).
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if open_target_cache(cache_dir, teacher.fingerprint, spec, prompts) == "complete":
        return manifest_path
    header = cache_header(teacher.fingerprint, spec, prompts)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_json(header, cache_dir / CACHE_HEADER)
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    negative = negative[:1]
    if rank == 0 and not (cache_dir / "prompt_embeds.safetensors").is_file():
        save_atomically({"prompt_embeds": embeds, "negative_embeds": negative}, cache_dir / "prompt_embeds.safetensors")
    shards = [list(range(i, min(i + spec.shard_prompts, len(prompts)))) for i in range(0, len(prompts), spec.shard_prompts)]
    pending = [k for k in range(len(shards)) if k % world_size == rank and not (cache_dir / _shard_name(k)).is_file()]
    if pending:
        mine = [i for k in pending for i in shards[k]]
        targets = compute_targets(teacher, spec, mine, embeds, negative, progress=progress)
        for k in pending:
            save_atomically(_shard_part(targets, torch.tensor(shards[k])), cache_dir / _shard_name(k))
    if barrier is not None:
        barrier()
    if rank == 0:
        counts = [_shard_length(cache_dir / _shard_name(k)) for k in range(len(shards))]
        manifest = dict(header, teacher=teacher.source, prompts=prompts,
                        shards=[{"file": _shard_name(k), "count": c} for k, c in enumerate(counts)])
        _write_json(manifest, manifest_path)
    if barrier is not None:
        barrier()
    return manifest_path


def _shard_part(targets: dict, prompts: torch.Tensor) -> dict:
    """The targets of `prompts`: their records, and the rows of the trajectory table (if any) of their trajectories."""
    keep = torch.isin(targets["prompt_index"], prompts)
    part = {key: value[keep] for key, value in targets.items() if key not in TRAJECTORY_TABLE}
    if "final_prompt_index" in targets:
        keep = torch.isin(targets["final_prompt_index"], prompts)
        part.update({key: targets[key][keep] for key in TRAJECTORY_TABLE})
    return part


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _shard_length(path: Path) -> int:
    """Number of targets in a shard, read from its safetensors header (the tensors stay on disk)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_slice("timesteps").get_shape()[0]


def load_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec,
                      prompts: list[str]) -> tuple[TargetSet, dict]:
    """Read a complete target cache made with this teacher (`Teacher.fingerprint` or
    `TeacherInfo.fingerprint(dtype)`: no teacher weights needed), spec and prompts: the TargetSet and the manifest."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    if open_target_cache(cache_dir, teacher_fingerprint, spec, prompts) != "complete":
        raise FileNotFoundError(f"{cache_dir} holds no complete target cache (no manifest.json): build it first")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    shards = [load_file(cache_dir / s["file"]) for s in manifest["shards"]]
    embeds = load_file(cache_dir / "prompt_embeds.safetensors")
    return TargetSet(concat_records(shards), embeds["prompt_embeds"], embeds["negative_embeds"]), manifest
