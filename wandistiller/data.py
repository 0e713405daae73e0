"""Prompts and training data for distillation: prompt files, the (x_t, t) points of each latent source, and the
teacher's velocities there. The cache that keeps them on disk is `wandistiller.cache`."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .flow import add_noise, guided_velocity, scheduler_shift


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
# once and kept on disk (`wandistiller.cache`), and training can run from them without the teacher.

LATENT_SOURCES = ("trajectory", "noise", "renoise", "images")


@dataclass
class TargetSpec:
    """Everything that decides which targets a cache holds (recorded in its manifest)."""

    latent_source: str = "trajectory"
    height: int = 64
    width: int = 64
    num_inference_steps: int = 8
    samples_per_prompt: int = 4
    trajectories_per_prompt: int = 1
    seed: int = 0
    images_path: str | None = None
    shard_prompts: int = 8

    def __post_init__(self):
        if self.latent_source not in LATENT_SOURCES:
            raise ValueError(f"unknown latent_source {self.latent_source!r}: use one of {', '.join(LATENT_SOURCES)}")
        if self.latent_source == "images" and not self.images_path:
            raise ValueError("latent_source='images' needs images_path=<a folder of images>")
        if self.trajectories_per_prompt != 1 and self.latent_source != "trajectory":
            raise ValueError(f"trajectories_per_prompt={self.trajectories_per_prompt} applies to latent_source="
                             f"'trajectory' only: use samples_per_prompt for {self.latent_source!r}")


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
                    x, t_batch = x_t[:, :, 0], t.float().expand(len(idx))
                    out = teacher.query(x, t_batch, embeds[idx], negative[idx])
                    records.append({"latents": x.clone(), "timesteps": t_batch.clone(), "prompt_index": idx,
                                    "v_cond": out.v_cond, "v_uncond": out.v_uncond, "guidance": out.guidance})
                    velocity = guided_velocity(out.v_cond, out.v_uncond, g)[:, :, None]
                    chunk["latents"] = sched.step(velocity, t, x_t, return_dict=False)[0]
                    bar.update()
    bar.close()
    final = torch.cat([chunk["latents"] for chunk in chunks])
    return concat_records(records), final


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
                out = teacher.query(latents[part], timesteps[part], embeds[part], negative[part])
                v_cond[part], v_uncond[part], guidance[part] = out.v_cond, out.v_uncond, out.guidance
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
    if spec.latent_source == "trajectory":  # trajectory j of a prompt starts from its noise sample j
        k = spec.trajectories_per_prompt
        noise = torch.cat([_prompt_noise(teacher, spec, i, j) for i in prompt_indices for j in range(k)])
        records, _ = record_trajectories(teacher, embeds.repeat_interleave(k, 0), negative.repeat_interleave(k, 0),
                                         noise, spec, progress=progress)
        records["prompt_index"] = torch.tensor(prompt_indices).repeat_interleave(k)[records["prompt_index"]]
        return records
    noise = torch.cat([_prompt_noise(teacher, spec, i) for i in prompt_indices])
    k = spec.samples_per_prompt
    shift = scheduler_shift(teacher.pipe.scheduler.config)
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
    return {"latents": add_noise(x0, eps, timesteps), "timesteps": timesteps, "prompt_index": prompt_index}


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


def concat_records(records: list[dict]) -> dict:
    """One dict of tensors from a list of dicts with the same keys (concatenated along the batch)."""
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def make_online_inputs(teacher, prompts: list[str], spec: TargetSpec, *, progress=True) -> TargetSet:
    """Inputs for online training (the loop queries the teacher per batch). Trajectory inputs still come from
    the teacher's sampler; their recorded velocities are dropped so that the loop's live query is the target."""
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    inputs = make_inputs(teacher, spec, list(range(len(prompts))), embeds, negative, progress=progress)
    inputs = {k: inputs[k] for k in ("latents", "timesteps", "prompt_index")}
    return TargetSet(inputs, embeds, negative[:1])

