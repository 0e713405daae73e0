"""What recording a teacher's targets will cost, read from config files before any weight is loaded.

`make_plan` counts the teacher forwards a trajectory cache needs (CFG doubles a step; A14B splits steps
between its experts at the boundary, each with its own guidance), their FLOPs (one forward of each expert
on the meta device), the disk the cache takes, and GPU-hours at a stated throughput. `wandistiller plan`
prints it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import flow
from .viz import Table

# Achieved bf16 throughput of one A14B expert forward on an NVIDIA H200 (benchmarks/README.md: 28.0 TFLOP in
# 63.6 ms at 512², 115.6 TFLOP in 242.7 ms at 1024²), rounded down: a measured figure, not the card's peak.
H200_TFLOPS = 440.0


@dataclass(frozen=True)
class Plan:
    """The cost of recording trajectory targets for `prompts` × `trajectories_per_prompt` (see `make_plan`)."""

    teacher: str
    variant: str
    prompts: int
    trajectories_per_prompt: int
    height: int
    width: int
    num_inference_steps: int
    steps_per_expert: dict[str, int]
    guidance: dict[str, float]
    forward_tflop: dict[str, float]  # one forward, batch 1, per expert
    bytes_per_prompt: int
    tflops: float  # assumed sustained throughput per GPU

    @property
    def trajectories(self) -> int:
        return self.prompts * self.trajectories_per_prompt

    def forwards_per_trajectory(self, name: str) -> int:
        return self.steps_per_expert[name] * (2 if self.guidance[name] > 1 else 1)

    @property
    def teacher_forwards(self) -> int:
        return self.trajectories * sum(self.forwards_per_trajectory(n) for n in self.steps_per_expert)

    @property
    def total_tflop(self) -> float:
        return self.trajectories * sum(self.forwards_per_trajectory(n) * self.forward_tflop[n] for n in self.steps_per_expert)

    @property
    def cache_bytes(self) -> int:
        return self.bytes_per_prompt * self.prompts

    @property
    def gpu_hours(self) -> float:
        return self.total_tflop / self.tflops / 3600

    def table(self) -> Table:
        rows = [("teacher", f"{self.teacher} ({self.variant})"),
                ("trajectories", f"{self.prompts:,} prompts × {self.trajectories_per_prompt} = {self.trajectories:,}"),
                ("image", f"{self.height}×{self.width}, {self.num_inference_steps} steps")]
        for name, steps in self.steps_per_expert.items():
            cfg = "CFG, 2 forwards/step" if self.guidance[name] > 1 else "no CFG"
            rows.append((f"  {name}", f"{steps} steps, guidance {self.guidance[name]:g} ({cfg}), "
                                      f"{self.forward_tflop[name]:.3g} TFLOP per forward"))
        rows += [("teacher forwards", f"{self.teacher_forwards:,}"),
                 ("teacher compute", f"{self.total_tflop / 1e3:,.4g} PFLOP"),
                 ("target cache", f"{_size(self.cache_bytes)} ({_size(self.bytes_per_prompt)} per prompt)"),
                 ("GPU-hours", f"{self.gpu_hours:,.3g} at {self.tflops:g} TFLOP/s per GPU")]
        return Table(["", "plan"], rows, title="Recording cost (configs only, no weights loaded)")


def _size(n: float) -> str:
    """Decimal units: 999 B, 1.5 KB, ... TB (larger sizes stay in TB)."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            break
    return f"{n:,.1f} {unit}"


def steps_per_expert(info, num_inference_steps: int) -> dict[str, int]:
    """How many of the sampler's steps each expert takes (WanPipeline's rule: t >= boundary -> `transformer`)."""
    from diffusers import UniPCMultistepScheduler

    from .teacher import read_json

    scheduler = UniPCMultistepScheduler.from_config(read_json(info.source / "scheduler" / "scheduler_config.json"))
    scheduler.set_timesteps(num_inference_steps)
    ratio = info.index.get("boundary_ratio")
    names = info.expert_names
    if len(names) == 1 or ratio is None:
        return {names[0]: num_inference_steps}
    boundary = ratio * flow.NUM_TRAIN_TIMESTEPS
    high = sum(float(t) >= boundary for t in scheduler.timesteps)
    return {"transformer": high, "transformer_2": num_inference_steps - high}


def expert_forward_tflop(info, name: str, latent_hw: tuple[int, int]) -> float:
    """TFLOP of one forward of expert `name` (batch 1, one frame, 512 text tokens), counted on the meta device."""
    return _forward_tflop(json.dumps(info.transformer_config(name), sort_keys=True), latent_hw)


@functools.lru_cache(maxsize=8)
def _forward_tflop(config_json: str, latent_hw: tuple[int, int]) -> float:
    """Counted once per distinct config (A14B's two experts share one)."""
    from diffusers import WanTransformer3DModel

    from .evaluate import forward_flops

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(json.loads(config_json))
    return forward_flops(model, latent_hw, device="meta") / 1e12


def mean_text_tokens(info, prompts: list[str]) -> float:
    """The mean true token length of `prompts` (what the cache keeps of their embeddings), counted with the
    teacher's tokenizer as WanPipeline counts it: cleaned text, end-of-text token included, at most 512."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(info.source / "tokenizer")
    ids = tokenizer([prompt_clean(p) for p in prompts], max_length=flow.MAX_SEQUENCE_LENGTH, truncation=True,
                    add_special_tokens=True).input_ids
    return sum(map(len, ids)) / len(ids)


def make_plan(teacher_path: str = "tiny", data_path: str | Path | None = None, *, height: int = 512, width: int = 512,
              num_inference_steps: int = 40, trajectories_per_prompt: int = 1, guidance_scale: float | None = None,
              guidance_scale_2: float | None = None, tflops: float = H200_TFLOPS, prompt_column: str | None = None,
              cache_dtype: str = "bfloat16", teacher_dtype: str = "float32",
              steps_per_trajectory: int | None = None) -> Plan:
    """The cost of recording targets for the prompts in `data_path` (the default prompts when None; the column
    `prompt_column` of a table, as `read_prompts`), into a cache of guided targets (cfg_distill) in `cache_dtype`
    with the prompt embeddings in `teacher_dtype`, keeping `steps_per_trajectory` steps (None: all)."""
    from .cache import cache_bytes_per_prompt
    from .data import DEFAULT_PROMPTS_PATH, TargetSpec, read_prompts
    from .teacher import read_json, read_teacher_info, resolve_dtype

    if tflops <= 0:
        raise ValueError(f"tflops={tflops} must be positive: pass the sustained TFLOP/s of one GPU")
    for label, value in (("num_inference_steps", num_inference_steps), ("trajectories_per_prompt", trajectories_per_prompt)):
        if value < 1:
            raise ValueError(f"{label}={value} must be at least 1")
    info = read_teacher_info(teacher_path, guidance_scale, guidance_scale_2)
    factor = info.vae_scale_factor
    config = info.transformer_config()
    patch = config["patch_size"][-1]
    if height % (factor * patch) or width % (factor * patch):
        raise ValueError(f"height and width must be multiples of {factor * patch} for this teacher "
                         f"(VAE factor {factor} × patch {patch}); got {height}×{width}")
    latent_hw = (height // factor, width // factor)
    rope = config.get("rope_max_seq_len", 1024)
    if max(latent_hw) // patch > rope:
        raise ValueError(f"{height}×{width} is beyond this teacher's positions (RoPE covers {rope} patches per axis): "
                         f"use at most {rope * patch * factor} pixels a side")
    prompts = read_prompts(data_path or DEFAULT_PROMPTS_PATH, prompt_column)
    steps = steps_per_expert(info, num_inference_steps)
    guidance = {"transformer": info.guidance_scale, "transformer_2": info.guidance_scale_2 or info.guidance_scale}
    z_dim = read_json(info.source / "vae" / "config.json")["z_dim"]
    spec = TargetSpec(height=height, width=width, num_inference_steps=num_inference_steps,
                      trajectories_per_prompt=trajectories_per_prompt, dtype=cache_dtype,
                      steps_per_trajectory=steps_per_trajectory)
    text_dtype = str(resolve_dtype(teacher_dtype)).removeprefix("torch.")
    return Plan(
        teacher=str(teacher_path), variant=info.variant, prompts=len(prompts), trajectories_per_prompt=trajectories_per_prompt,
        height=height, width=width, num_inference_steps=num_inference_steps, steps_per_expert=steps,
        guidance={n: guidance[n] for n in steps},
        forward_tflop={n: expert_forward_tflop(info, n, latent_hw) for n in steps},
        bytes_per_prompt=round(cache_bytes_per_prompt(spec, latent_channels=z_dim, latent_hw=latent_hw,
                                                      text_dim=config["text_dim"], text_dtype=text_dtype,
                                                      text_tokens=mean_text_tokens(info, prompts))),
        tflops=tflops)
