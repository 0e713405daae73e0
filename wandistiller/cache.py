"""The teacher target cache: teacher velocities at the training points, kept on disk as safetensors shards.

Every reader and writer opens a cache through `open_target_cache`, which checks that it was made with this
teacher (`Teacher.fingerprint`), these target settings (`TargetSpec`) and these prompts. Building is resumable
and split across ranks; `load_target_cache` reads a complete cache without any teacher weights.

Layout, one pair of files per `spec.shard_prompts` prompts:
- `text_NNNNN.safetensors`: the prompts' embeddings stored once, cut to their true token length (`tokens`, one
  prompt's rows after another, and `lengths`); `text_padding.pad_text` gives back WanPipeline's zero-padded
  512-token tensors exactly. `negative_embeds.safetensors` holds the negative prompt's the same way.
- `shard_NNNNN.safetensors`: the targets of those prompts (latent-sized tensors in `spec.dtype`, the velocity
  `spec.velocity` keeps) and, for trajectories, their final latents.
- `cache_header.json` (written first) and `manifest.json` (written last, by rank 0: the cache is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import LATENT_KEYS, TRAJECTORY_TABLE, TargetSet, TargetSpec, compute_targets, concat_records
from .text_padding import pad_text, trim_text

# 3: compact: latent-sized tensors in spec.dtype, one stored velocity unless spec.velocity="both", prompt
#    embeddings cut to their true length and stored once per shard (text_NNNNN)
# 2: trajectory shards also hold each trajectory's final latents and each record's trajectory id (reflow's pairs)
CACHE_FORMAT = 3
# Prompts recorded together: A14B swaps its 14 B experts once per group (every trajectory's high-noise steps run
# before any low-noise step), and the group's targets are what recording holds in memory.
RECORD_GROUP_PROMPTS = 64
NEGATIVE_FILE = "negative_embeds.safetensors"


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

    A cache made with another teacher, spec or prompts (or of unknown origin, or by an older kit in another cache
    format) raises a ValueError, or with `discard_mismatch=True` its target files are deleted and the state is
    "empty".
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
        older = isinstance(found, dict) and found.get("format") != CACHE_FORMAT
        if older:
            raise ValueError(f"the target cache {cache_dir} is in cache format {found.get('format')}, from another "
                             f"version of wandistiller (this one reads format {CACHE_FORMAT}): pass overwrite=True to "
                             "record it again, or another cache_dir (the existing one is kept)")
        if "target settings" in differs and isinstance(found.get("spec"), dict):
            differs[differs.index("target settings")] = f"target settings ({_spec_differences(found['spec'], spec)})"
        raise ValueError(f"the target cache {cache_dir} was made with other {', '.join(differs)}: pass overwrite=True "
                         "to discard it, or another cache_dir (the existing one is kept)")
    for path in [cache_dir / "manifest.json", cache_dir / CACHE_HEADER, cache_dir / NEGATIVE_FILE,
                 cache_dir / "prompt_embeds.safetensors", *cache_dir.glob("shard_*.safetensors"),
                 *cache_dir.glob("text_*.safetensors")]:
        path.unlink(missing_ok=True)
    return "empty"


def _spec_differences(found: dict, spec: TargetSpec) -> str:
    """`name: cached value, not wanted value` for each TargetSpec field that differs."""
    return "; ".join(f"{f.name}: {found.get(f.name)!r} in the cache, {getattr(spec, f.name)!r} wanted"
                     for f in fields(spec) if found.get(f.name) != getattr(spec, f.name))


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same file
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def shard_prompts(num_prompts: int, spec: TargetSpec) -> list[range]:
    """The prompts of each shard: consecutive runs of `spec.shard_prompts`."""
    return [range(i, min(i + spec.shard_prompts, num_prompts)) for i in range(0, num_prompts, spec.shard_prompts)]


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _text_name(k: int) -> str:
    return f"text_{k:05d}.safetensors"


def _start(teacher, prompts: list[str], cache_dir: Path, spec: TargetSpec) -> bool:
    """Check the cache against this teacher, spec and prompts and mark it as being built; True if complete."""
    if open_target_cache(cache_dir, teacher.fingerprint, spec, prompts) == "complete":
        return True
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_json(cache_header(teacher.fingerprint, spec, prompts), cache_dir / CACHE_HEADER)
    return False


def write_prompt_embeddings(teacher, prompts: list[str], cache_dir: str | Path, spec: TargetSpec, *, rank: int = 0,
                            world_size: int = 1, progress=True) -> None:
    """The text files of a target cache: each shard's prompt embeddings, cut to their true length, and the negative
    prompt's. The text side of recording, done before any expert is loaded (the text encoder can then be freed);
    resumable and split across ranks as `build_target_cache`. Every rank keeps the negative prompt's embedding
    in the teacher, since recording needs it."""
    cache_dir = Path(cache_dir)
    if _start(teacher, prompts, cache_dir, spec):
        return
    negative = teacher.encode_prompts("")  # Wan's default negative prompt, kept in the teacher
    if rank == 0 and not (cache_dir / NEGATIVE_FILE).is_file():
        save_atomically(dict(zip(("tokens", "lengths"), trim_text(negative))), cache_dir / NEGATIVE_FILE)
    shards = shard_prompts(len(prompts), spec)
    pending = [k for k in range(rank, len(shards), world_size) if not (cache_dir / _text_name(k)).is_file()]
    for k in tqdm(pending, desc="encoding prompts", unit="shard", disable=not progress or not pending, leave=False):
        embeds = teacher.encode_prompts([prompts[i] for i in shards[k]], keep=False)
        save_atomically(dict(zip(("tokens", "lengths"), trim_text(embeds))), cache_dir / _text_name(k))


def read_embeddings(path: Path) -> torch.Tensor:
    """The zero-padded prompt embeddings (B, 512, D) kept in a text file of the cache."""
    from safetensors.torch import load_file

    text = load_file(path)
    return pad_text(text["tokens"], text["lengths"])


def build_target_cache(teacher, prompts: list[str], cache_dir: str | Path, spec: TargetSpec, *,
                       rank: int = 0, world_size: int = 1, barrier=None, progress=True) -> Path:
    """Write the teacher targets for `prompts` to `cache_dir` (resumable; shards split across ranks).

    The prompts are encoded first (`write_prompt_embeddings`, skipped when done), then recorded
    `RECORD_GROUP_PROMPTS` at a time, each shard written as soon as its group is done; finished shards are
    skipped, so an interrupted build continues where it stopped. Rank 0 writes `manifest.json` last. A cache
    made with another teacher, spec or prompts is refused (see `open_target_cache`).
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if _start(teacher, prompts, cache_dir, spec):
        return manifest_path
    write_prompt_embeddings(teacher, prompts, cache_dir, spec, rank=rank, world_size=world_size, progress=progress)
    negative = teacher.encode_prompts("")
    shards = shard_prompts(len(prompts), spec)
    pending = [k for k in range(rank, len(shards), world_size) if not (cache_dir / _shard_name(k)).is_file()]
    bar = tqdm(total=sum(len(shards[k]) for k in pending), desc="recording teacher targets", unit="prompt",
               disable=not progress or not pending)
    for group in _groups(pending, shards):
        indices = [i for k in group for i in shards[k]]
        embeds = torch.cat([read_embeddings(cache_dir / _text_name(k)) for k in group])
        targets = compute_targets(teacher, spec, indices, embeds, negative, progress=progress)
        for k in group:
            save_atomically(_shard_part(targets, torch.tensor(shards[k]), spec), cache_dir / _shard_name(k))
        bar.update(len(indices))
    bar.close()
    if barrier is not None:
        barrier()
    if rank == 0:
        counts = [_shard_length(cache_dir / _shard_name(k)) for k in range(len(shards))]
        manifest = dict(cache_header(teacher.fingerprint, spec, prompts), teacher=teacher.source, prompts=prompts,
                        negative=NEGATIVE_FILE,
                        shards=[{"file": _shard_name(k), "text": _text_name(k), "count": c,
                                 "prompts": [shards[k].start, shards[k].stop]} for k, c in enumerate(counts)])
        _write_json(manifest, manifest_path)
    if barrier is not None:
        barrier()
    return manifest_path


def _groups(pending: list[int], shards: list[range]) -> list[list[int]]:
    """`pending` shards in groups of about `RECORD_GROUP_PROMPTS` prompts (at least one shard each)."""
    groups, size = [], RECORD_GROUP_PROMPTS
    for k in pending:
        if size + len(shards[k]) > RECORD_GROUP_PROMPTS:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += len(shards[k])
    return groups


def _shard_part(targets: dict, prompts: torch.Tensor, spec: TargetSpec) -> dict:
    """The targets of `prompts` as a shard stores them: their records, and the rows of the trajectory table (if
    any) of their trajectories; latent-sized tensors in `spec.dtype`."""
    keep = torch.isin(targets["prompt_index"], prompts)
    part = {key: value[keep] for key, value in targets.items() if key not in TRAJECTORY_TABLE}
    if "final_prompt_index" in targets:
        keep = torch.isin(targets["final_prompt_index"], prompts)
        part.update({key: targets[key][keep] for key in TRAJECTORY_TABLE})
    dtype = getattr(torch, spec.dtype)
    return {key: value.to(dtype) if key in LATENT_KEYS else value for key, value in part.items()}


def _shard_length(path: Path) -> int:
    """Number of targets in a shard, read from its safetensors header (the tensors stay on disk)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_slice("timesteps").get_shape()[0]


def load_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec,
                      prompts: list[str]) -> tuple[TargetSet, dict]:
    """Read a complete target cache made with this teacher (`Teacher.fingerprint` or
    `TeacherInfo.fingerprint(dtype)`: no teacher weights needed), spec and prompts, all of it into memory: the
    TargetSet (latent-sized tensors in float32, embeddings zero-padded as WanPipeline's) and the manifest."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    if open_target_cache(cache_dir, teacher_fingerprint, spec, prompts) != "complete":
        raise FileNotFoundError(f"{cache_dir} holds no complete target cache (no manifest.json): build it first")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    records = concat_records([load_file(cache_dir / s["file"]) for s in manifest["shards"]])
    records = {key: value.float() if key in LATENT_KEYS else value for key, value in records.items()}
    embeds = torch.cat([read_embeddings(cache_dir / s["text"]) for s in manifest["shards"]])
    return TargetSet(records, embeds, read_embeddings(cache_dir / manifest["negative"])), manifest


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_bytes_per_prompt(spec: TargetSpec, *, latent_channels: int, latent_hw: tuple[int, int], text_dim: int,
                           text_tokens: float, text_dtype: str = "float32") -> float:
    """Bytes a prompt takes in a target cache written with `spec` (safetensors headers aside).

    Per record: the input latents and the kept velocity (one tensor, or v_cond and v_uncond with
    velocity="both"), C x h x w each in `spec.dtype`; the timestep and guidance (float32), the prompt index
    (int64) and, for trajectories, the trajectory id (int64). Per trajectory: its final latents and prompt index.
    Per prompt: its embeddings, `text_tokens` rows of `text_dim` in the teacher's `text_dtype`, and their length.
    """
    latent = latent_channels * latent_hw[0] * latent_hw[1] * _DTYPE_BYTES[spec.dtype]
    per_record = (2 + (spec.velocity == "both")) * latent + 4 + 4 + 8
    if spec.latent_source == "trajectory":
        steps = len(spec.kept_steps())
        targets = spec.trajectories_per_prompt * (steps * (per_record + 8) + latent + 8)
    else:
        targets = spec.samples_per_prompt * per_record
    return targets + text_tokens * text_dim * _DTYPE_BYTES[text_dtype] + 8
