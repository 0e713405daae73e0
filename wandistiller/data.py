"""Prompts and training data for distillation."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm


def packaged_file(*parts: str) -> Path:
    """A file shipped inside the package: `packaged_file("config", "student_config.json")`, `("data", ...)` or
    `("notebooks", ...)` - the repository's folders of those names, found in any install (importlib.resources)."""
    return Path(str(resources.files(__package__).joinpath("assets", *parts))).resolve()


DEFAULT_PROMPTS_PATH = packaged_file("data", "static_prompts.txt")


def read_prompts(path: str | Path = DEFAULT_PROMPTS_PATH) -> list[str]:
    """Read a UTF-8 prompts file: one prompt per line, blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist: pass data_path=<a UTF-8 text file, one prompt per line>")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not valid UTF-8 (byte {err.start}): re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one prompt per line (lines starting with # are comments)")
    return prompts


# --- teacher targets --------------------------------------------------------------------------------------
#
# A target is one (x_t, t, prompt) point with the teacher's conditional and unconditional velocity there and
# the guidance scale of the expert that produced them. Targets are student-independent, so they are computed
# once, written to `cache_dir` as safetensors shards, and training can run from them without the teacher.

LATENT_SOURCES = ("trajectory", "noise", "renoise", "images")
TARGET_KEYS = ("latents", "timesteps", "prompt_index", "v_cond", "v_uncond", "guidance")
CACHE_FORMAT = 1


@dataclass
class TargetSpec:
    """Everything that decides which targets a cache holds (recorded in its manifest)."""

    latent_source: str = "trajectory"
    height: int = 64
    width: int = 64
    num_inference_steps: int = 8
    samples_per_prompt: int = 4
    seed: int = 0
    images_path: str | None = None
    shard_prompts: int = 8

    def __post_init__(self):
        if self.latent_source not in LATENT_SOURCES:
            raise ValueError(f"unknown latent_source {self.latent_source!r}: use one of {', '.join(LATENT_SOURCES)}")
        if self.latent_source == "images" and not self.images_path:
            raise ValueError("latent_source='images' needs images_path=<a folder of images>")


class TargetSet(torch.utils.data.Dataset):
    """Targets in memory: per-sample tensors plus the prompt-embedding table they index into."""

    def __init__(self, tensors: dict, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor):
        self.tensors = tensors
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds

    def __len__(self) -> int:
        return len(self.tensors["timesteps"])

    def __getitem__(self, index: int) -> dict:
        return {key: value[index] for key, value in self.tensors.items()}


def _prompt_noise(teacher, spec: TargetSpec, prompt_index: int, sample: int = 0) -> torch.Tensor:
    """Noise for one prompt, a function of (seed, prompt, sample) only, so every rank and rerun agrees."""
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + prompt_index * 1009 + sample)
    return torch.randn(teacher.latent_shape(1, spec.height, spec.width), generator=generator)


def _guided(teacher, name: str, latents, timesteps, embeds, negative):
    """(v_cond, v_uncond); without CFG (guidance_scale <= 1) WanPipeline makes no unconditional pass, and
    v_uncond = v_cond makes every guided target equal the conditional velocity exactly."""
    v_cond = teacher.expert_velocity(name, latents, timesteps, embeds)
    if not teacher.uses_cfg:
        return v_cond, v_cond
    v_uncond = teacher.expert_velocity(name, latents, timesteps, negative)
    return v_cond, v_uncond


@torch.no_grad()
def record_trajectories(teacher, embeds, negative, noise, spec: TargetSpec, *, batch_size: int = 8, progress=True):
    """Run the teacher's own sampler from `noise` and record every (x_t, t, v_cond, v_uncond) on the way.

    Expert by expert: every trajectory's high-noise steps run with only that expert resident, then the
    low-noise steps with only the other, so one 14B expert is in memory at a time. The sampler (a copy of the
    pipeline's scheduler per batch) and CFG are WanPipeline's, so the final latents equal the pipeline's.
    Returns (records: dict of tensors with prompt-local `prompt_index`, final latents (B, C, 1, H, W)).
    """
    import copy

    scheduler = copy.deepcopy(teacher.pipe.scheduler)
    scheduler.set_timesteps(spec.num_inference_steps)
    timesteps = scheduler.timesteps
    chunks = []
    for start in range(0, len(noise), batch_size):
        sched = copy.deepcopy(scheduler)
        sched.set_begin_index(0)
        chunks.append({"index": torch.arange(start, min(start + batch_size, len(noise))),
                       "latents": noise[start:start + batch_size].clone(), "scheduler": sched})
    records = []
    experts = [teacher.expert_for_timestep(t) for t in timesteps]  # raises for a step no expert takes
    phases = [(name, [t for t, e in zip(timesteps, experts) if e == name]) for name in teacher.expert_names]
    total = sum(len(steps) for _, steps in phases) * len(chunks)
    bar = tqdm(total=total, desc="recording teacher trajectories", disable=not progress)
    for name, steps in phases:
        if not steps:
            continue
        with teacher.only_expert(name):
            g = teacher.guidance_for_expert(name)
            for chunk in chunks:
                idx, sched = chunk["index"], chunk["scheduler"]
                for t in steps:
                    x_t = chunk["latents"]
                    t_batch = t.float().expand(len(idx))
                    v_cond, v_uncond = _guided(teacher, name, x_t, t_batch, embeds[idx], negative[idx])
                    records.append({"latents": x_t[:, :, 0].clone(), "timesteps": t_batch.clone(), "prompt_index": idx,
                                    "v_cond": v_cond[:, :, 0], "v_uncond": v_uncond[:, :, 0],
                                    "guidance": torch.full((len(idx),), float(g))})
                    chunk["latents"] = sched.step(v_uncond + g * (v_cond - v_uncond), t, x_t, return_dict=False)[0]
                    bar.update()
    bar.close()
    final = torch.cat([chunk["latents"] for chunk in chunks])
    return _concat(records), final


@torch.no_grad()
def query_targets(teacher, latents, timesteps, embeds, negative, *, batch_size: int = 8, progress=True) -> dict:
    """Teacher velocities at given points (latents (N, C, H, W)), expert by expert (one resident at a time)."""
    v_cond = torch.empty_like(latents)
    v_uncond = torch.empty_like(latents)
    guidance = torch.empty(len(latents))
    bar = tqdm(total=len(latents), desc="querying teacher", disable=not progress)
    for name, idx in teacher.split_by_expert(timesteps):
        with teacher.only_expert(name):
            for part in idx.split(batch_size):
                vc, vu = _guided(teacher, name, latents[part][:, :, None], timesteps[part], embeds[part], negative[part])
                v_cond[part], v_uncond[part] = vc[:, :, 0], vu[:, :, 0]
                guidance[part] = teacher.guidance_for_expert(name)
                bar.update(len(part))
    bar.close()
    return {"v_cond": v_cond, "v_uncond": v_uncond, "guidance": guidance}


def _random_timesteps(spec: TargetSpec, prompt_index: int, count: int, shift: float) -> torch.Tensor:
    from .loss import sample_timesteps

    generator = torch.Generator().manual_seed(spec.seed * 7919 + prompt_index)
    return sample_timesteps(count, generator=generator, shift=shift)


def load_images(folder: str | Path, height: int, width: int) -> torch.Tensor:
    """All images in `folder`, centre-cropped and resized to height x width, as (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not files:
        raise ValueError(f"no images (.png/.jpg/.jpeg/.webp/.bmp) found in {folder}: pass images_path=<a folder of images>")
    arrays = [np.asarray(ImageOps.fit(Image.open(f).convert("RGB"), (width, height)), dtype=np.float32) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def make_inputs(teacher, spec: TargetSpec, prompt_indices: list[int], embeds, negative, *, progress=True) -> dict:
    """The (x_t, t, prompt) points of `spec.latent_source` for the given prompts (no velocities yet),
    except for `trajectory`, whose points come with their velocities since the sampler produces both."""
    noise = torch.cat([_prompt_noise(teacher, spec, i) for i in prompt_indices])
    if spec.latent_source == "trajectory":
        records, _ = record_trajectories(teacher, embeds, negative, noise, spec, progress=progress)
        records["prompt_index"] = torch.tensor(prompt_indices)[records["prompt_index"]]
        return records
    k = spec.samples_per_prompt
    shift = teacher.pipe.scheduler.config.get("flow_shift", 3.0) or 3.0
    timesteps = torch.cat([_random_timesteps(spec, i, k, shift) for i in prompt_indices])
    eps = torch.cat([_prompt_noise(teacher, spec, i, sample) for i in prompt_indices for sample in range(1, k + 1)])[:, :, 0]
    prompt_index = torch.tensor(prompt_indices).repeat_interleave(k)
    if spec.latent_source == "noise":
        # The original tool's inputs: pure noise presented at an arbitrary timestep.
        return {"latents": eps, "timesteps": timesteps, "prompt_index": prompt_index}
    if spec.latent_source == "renoise":
        _, final = record_trajectories(teacher, embeds, negative, noise, spec, progress=progress)
        x0 = final[:, :, 0].repeat_interleave(k, dim=0)
    else:
        images = load_images(spec.images_path, spec.height, spec.width)
        x0 = torch.cat([teacher.encode_images(images[[i % len(images)]]) for i in prompt_index.tolist()])[:, :, 0]
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    return {"latents": (1 - sigma) * x0 + sigma * eps, "timesteps": timesteps, "prompt_index": prompt_index}


def compute_targets(teacher, spec: TargetSpec, prompt_indices: list[int], all_embeds, negative, *, progress=True) -> dict:
    """Inputs and teacher velocities for `prompt_indices` (indices into `all_embeds`)."""
    embeds = all_embeds[prompt_indices]
    neg = negative.expand(len(prompt_indices), -1, -1)
    inputs = make_inputs(teacher, spec, prompt_indices, embeds, neg, progress=progress)
    if "v_cond" in inputs:
        return inputs
    local = {p: j for j, p in enumerate(prompt_indices)}
    rows = torch.tensor([local[p] for p in inputs["prompt_index"].tolist()], dtype=torch.long)
    inputs.update(query_targets(teacher, inputs["latents"], inputs["timesteps"], embeds[rows], neg[rows], progress=progress))
    return inputs


def _concat(records: list[dict]) -> dict:
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def _atomic_save(tensors: dict, path: Path) -> None:
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
        _atomic_save({"prompt_embeds": embeds, "negative_embeds": negative}, cache_dir / "prompt_embeds.safetensors")
    shards = [list(range(i, min(i + spec.shard_prompts, len(prompts)))) for i in range(0, len(prompts), spec.shard_prompts)]
    pending = [k for k in range(len(shards)) if k % world_size == rank and not (cache_dir / _shard_name(k)).is_file()]
    if pending:
        mine = [i for k in pending for i in shards[k]]
        targets = compute_targets(teacher, spec, mine, embeds, negative, progress=progress)
        for k in pending:
            keep = torch.isin(targets["prompt_index"], torch.tensor(shards[k]))
            _atomic_save({key: value[keep] for key, value in targets.items()}, cache_dir / _shard_name(k))
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
    return TargetSet(_concat(shards), embeds["prompt_embeds"], embeds["negative_embeds"]), manifest


def make_online_inputs(teacher, prompts: list[str], spec: TargetSpec, *, progress=True) -> TargetSet:
    """Inputs for online training (the loop queries the teacher per batch). Trajectory inputs still come from
    the teacher's sampler; their recorded velocities are dropped so that the loop's live query is the target."""
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    inputs = make_inputs(teacher, spec, list(range(len(prompts))), embeds, negative, progress=progress)
    inputs = {k: inputs[k] for k in ("latents", "timesteps", "prompt_index")}
    return TargetSet(inputs, embeds, negative[:1])
