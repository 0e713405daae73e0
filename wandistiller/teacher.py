"""The Wan teacher: a diffusers WanPipeline loaded within the memory the user has.

`load_teacher` takes a diffusers Wan directory, a hub id, or the name of the embedded tiny teacher ("tiny",
"tiny-a14b", "tiny-ti2v-5b", "tiny-2.1"). `Teacher` routes each timestep to the expert WanPipeline would use,
applies classifier-free guidance the way WanPipeline does, and caches prompt embeddings.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .flow import MAX_SEQUENCE_LENGTH, guided_velocity, per_token_timesteps

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DEVICE_STRATEGIES = ("auto", "cpu", "cuda", "gpu0", "balanced")
EXPERT_ROLES = {"high_noise": "transformer", "low_noise": "transformer_2"}
# Guidance scales of the Wan 2.2 reference settings: A14B high-noise 4.0 / low-noise 3.0; TI2V-5B and 2.1 5.0.
DEFAULT_GUIDANCE = {"a14b": (4.0, 3.0), "ti2v-5b": (5.0, None), "2.1": (5.0, None)}


class TeacherNotAvailableError(RuntimeError):
    """The teacher's weights cannot be found locally or downloaded."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
    return DTYPES[dtype]


@dataclass(frozen=True)
class DevicePlan:
    """Where one process puts its teacher.

    Parameters:
        device: "cpu", "cuda:N", or "balanced" (accelerate spreads the pipeline's components over the GPUs).
        shared: one teacher copy on GPU 0 serves every rank of this machine (`gpu0` under torchrun).
        loads_teacher: False for the ranks of a shared teacher other than local rank 0: they must not load it.
    """

    device: str
    shared: bool = False
    loads_teacher: bool = True


def plan_teacher_device(strategy: str = "auto", *, local_rank: int = 0, local_world_size: int = 1,
                        gpu_count: int = 0, teacher_on_cpu: bool = False) -> DevicePlan:
    """The teacher's device for local rank `local_rank` of `local_world_size` ranks on a machine with `gpu_count`
    visible GPUs (a pure function: `load_teacher` passes torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE).

    cpu: the CPU. cuda: `cuda:{local_rank}`, one teacher per rank. gpu0: GPU 0; under torchrun one copy that
    local rank 0 loads and the other ranks never do. balanced: one process's teacher spread over all GPUs
    (refused with several ranks per machine, which would each spread a copy over the same GPUs).
    auto: `cuda:{local_rank}`, or balanced for a single process that sees several GPUs. Without a GPU every
    strategy falls back to the CPU with one warning.
    """
    if teacher_on_cpu:
        strategy = "cpu"
    if strategy not in DEVICE_STRATEGIES:
        raise ValueError(f"unknown device strategy {strategy!r}: use one of {', '.join(DEVICE_STRATEGIES)}")
    if strategy == "cpu":
        return DevicePlan("cpu")
    if gpu_count == 0:
        if strategy != "auto":
            warnings.warn(f"teacher device strategy {strategy!r} needs a GPU and none is visible: using the CPU")
        return DevicePlan("cpu")
    several = local_world_size > 1
    if strategy == "balanced" and several:
        raise ValueError(f"teacher device strategy 'balanced' spreads one teacher over all GPUs and cannot serve "
                         f"{local_world_size} ranks per machine: use 'cuda' (one teacher per rank on cuda:LOCAL_RANK) "
                         "or 'gpu0' (one teacher on GPU 0 for all ranks)")
    if strategy == "gpu0":
        return DevicePlan("cuda:0", shared=several, loads_teacher=local_rank == 0)
    if strategy == "balanced" or (strategy == "auto" and not several and gpu_count > 1):
        return DevicePlan("balanced")
    if local_rank >= gpu_count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {gpu_count} GPU(s) are visible: start at most "
                         f"{gpu_count} ranks per machine (torchrun --nproc_per_node={gpu_count})")
    return DevicePlan(f"cuda:{local_rank}")


def local_ranks() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def teacher_device_plan(strategy: str = "auto", teacher_on_cpu: bool = False) -> DevicePlan:
    """`plan_teacher_device` for this process: its local rank and the GPUs it sees."""
    local_rank, local_world_size = local_ranks()
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return plan_teacher_device(strategy, local_rank=local_rank, local_world_size=local_world_size,
                               gpu_count=gpu_count, teacher_on_cpu=teacher_on_cpu)


def resolve_device_strategy(strategy: str = "auto", teacher_on_cpu: bool = False) -> str:
    """This process's teacher device for a strategy: 'cpu', 'cuda:N' or 'balanced'."""
    return teacher_device_plan(strategy, teacher_on_cpu).device


def locate_teacher(path_or_id: str | Path) -> Path:
    """The local diffusers directory of a teacher, found as diffusers finds it.

    The embedded tiny teacher's names map to its directory (built on first use); a local path must exist; a hub
    id resolves to its snapshot in the Hugging Face cache (HF_HUB_CACHE), and is downloaded there first only
    when it is not cached and the hub is reachable.
    """
    name = str(path_or_id)
    if name == "toy" and not Path(name).exists():
        from .toy_world import toy_world_path

        return toy_world_path()
    if name == "tiny" or (name.startswith("tiny-") and not Path(name).exists()):
        from .toy import VARIANTS, tiny_wan_path

        variant = "a14b" if name == "tiny" else name[len("tiny-"):]
        if variant not in VARIANTS:
            raise ValueError(f"unknown tiny teacher {name!r}: use tiny, " + ", ".join(f"tiny-{v}" for v in VARIANTS))
        return tiny_wan_path(variant)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"teacher path {local} is a file: pass the diffusers pipeline directory that holds model_index.json")
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"teacher path {name} does not exist: pass a local Wan Diffusers directory, "
                                "a hub id such as Wan-AI/Wan2.2-T2V-A14B-Diffusers, or 'tiny'")
    from diffusers import DiffusionPipeline

    try:
        try:
            folder = DiffusionPipeline.download(name, local_files_only=True)
        except OSError:
            folder = DiffusionPipeline.download(name)
    except OSError as err:
        raise TeacherNotAvailableError(
            f"the teacher weights {name!r} are not available here ({str(err).splitlines()[0][:120]}): "
            "download the Diffusers checkpoint where you have internet and pass its local directory as teacher_path"
        ) from None
    return Path(folder)


def read_json(path: Path) -> dict:
    """A JSON file's content; a broken file is a one-line error naming the file and the position."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                         "fix the file or re-download it") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is corrupt: not UTF-8 text (byte {err.start}); fix the file or re-download it") from None


def check_weight_files(folder: Path) -> None:
    """Open the header of every safetensors file in `folder`: a truncated or corrupt one is a one-line error."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own error type (or OSError) for a bad file
            raise ValueError(f"teacher weight file {file} is corrupt or truncated ({str(err).splitlines()[0][:120]}): "
                             "re-download it") from None


def read_model_index(path: Path) -> dict:
    """Check that `path` is a diffusers Wan pipeline directory and return its model_index.json."""
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json): "
                         "pass a Wan 2.x Diffusers checkpoint, e.g. a download of Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    index = read_json(index_path)
    if not isinstance(index, dict) or not str(index.get("_class_name", "")).startswith("Wan"):
        found = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path} holds a {found} pipeline, not a Wan pipeline: pass a Wan 2.x Diffusers checkpoint")
    if not any(index.get(name) and index[name][0] for name in ("transformer", "transformer_2")):
        raise ValueError(f"{path} has no Wan transformer in model_index.json: the checkpoint is incomplete")
    return index


def detect_variant(index: dict) -> str:
    """'a14b' (two experts switched by timestep), 'ti2v-5b' (per-token timesteps, 48 channels) or '2.1'."""
    if index.get("boundary_ratio") is not None and (index.get("transformer_2") or [None])[0]:
        return "a14b"
    if index.get("expand_timesteps"):
        return "ti2v-5b"
    return "2.1"


def resolve_guidance(variant: str, guidance_scale: float | None = None,
                     guidance_scale_2: float | None = None) -> tuple[float, float | None]:
    """The (high-noise, low-noise) guidance scales, with WanPipeline's semantics.

    Nothing given: Wan 2.2's reference scales (A14B 4.0 / 3.0; TI2V-5B and 2.1 5.0). Only `guidance_scale`: the
    low-noise expert uses the same value, as WanPipeline does. CFG is skipped when guidance_scale <= 1
    (`Teacher.uses_cfg`). `guidance_scale_2` exists for A14B only.
    """
    default, default_2 = DEFAULT_GUIDANCE[variant]
    if variant != "a14b":
        if guidance_scale_2 is not None:
            raise ValueError(f"guidance_scale_2 is the low-noise expert's scale of Wan 2.2 A14B; this {variant} teacher "
                             "has one expert: pass guidance_scale only")
        return (default if guidance_scale is None else guidance_scale), None
    if guidance_scale is None:
        return default, (default_2 if guidance_scale_2 is None else guidance_scale_2)
    return guidance_scale, (guidance_scale if guidance_scale_2 is None else guidance_scale_2)


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher's config files say, read without loading any weights (`read_teacher_info`)."""

    source: Path
    index: dict
    variant: str
    guidance_scale: float
    guidance_scale_2: float | None

    @property
    def expert_names(self) -> list[str]:
        return ["transformer", "transformer_2"] if self.variant == "a14b" else ["transformer"]

    def transformer_config(self, name: str = "transformer") -> dict:
        return read_json(self.source / name / "config.json")

    @property
    def vae_scale_factor(self) -> int:
        # WanPipeline.vae_scale_factor_spatial
        return int(read_json(self.source / "vae" / "config.json").get("scale_factor_spatial", 8))

    def fingerprint(self, dtype: str | torch.dtype = "float32") -> str:
        return _fingerprint(self.source, self.variant, self.guidance_scale, self.guidance_scale_2, resolve_dtype(dtype))


def read_teacher_info(path_or_id: str | Path = "tiny", guidance_scale: float | None = None,
                      guidance_scale_2: float | None = None) -> TeacherInfo:
    """Locate a teacher and read its model index and component configs (every JSON file is checked)."""
    source = locate_teacher(path_or_id)
    index = read_model_index(source)
    for name in _components(index):
        for file in sorted((source / name).glob("*.json")):
            read_json(file)
    variant = detect_variant(index)
    g, g2 = resolve_guidance(variant, guidance_scale, guidance_scale_2)
    return TeacherInfo(source, index, variant, g, g2)


def _components(index: dict) -> list[str]:
    return [name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0]]


def _file_digest(path: Path, sample: int = 1 << 16) -> str:
    """Size plus the first and last 64 KiB: tells weights apart without reading 100+ GB."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(sample)
        f.seek(max(size - sample, 0))
        tail = f.read(sample)
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()}"


def _fingerprint(source: Path, variant: str, guidance_scale, guidance_scale_2, dtype: torch.dtype) -> str:
    """What makes a teacher's targets: every file of its components (sampled digests), variant, guidance, dtype."""
    source = Path(source)
    index = read_json(source / "model_index.json")
    files = {}
    for name in _components(index):
        for file in sorted((source / name).rglob("*")):
            if file.is_file() and not file.name.startswith("."):
                files[str(file.relative_to(source))] = _file_digest(file)
    raw = json.dumps([index, files, variant, guidance_scale, guidance_scale_2, str(dtype)], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class ExpertVelocities(NamedTuple):
    """One expert's answer (`Teacher.expert_velocities`): velocities (B, C, F, H, W), float32."""

    v_cond: torch.Tensor
    v_uncond: torch.Tensor
    blocks: list[torch.Tensor] | None  # each transformer block's output in the conditional pass


class TeacherTargets(NamedTuple):
    """Distillation targets of a batch (`Teacher.query`), every sample answered by its own expert."""

    v_cond: torch.Tensor
    v_uncond: torch.Tensor
    guidance: torch.Tensor  # (B,) the guidance scale of each sample's expert
    features: list[torch.Tensor] | None  # block outputs, one (B, N, D) tensor per teacher block


@dataclass
class Teacher:
    """A loaded Wan teacher. Build it with `load_teacher`.

    Experts are keyed by their WanPipeline attribute name: "transformer" (high-noise; the only one outside
    A14B) and "transformer_2" (low-noise). With `load_experts=False` they are loaded one at a time through
    `load_expert` / `only_expert`, so that only one 14B expert need ever be resident.
    """

    pipe: object
    source: str
    variant: str
    device: str
    dtype: torch.dtype
    guidance_scale: float
    guidance_scale_2: float | None
    cache_dir: Path | None = None
    _embed_cache: dict = field(default_factory=dict, repr=False)
    _text_encoder_config: str = field(default="", repr=False)

    def __post_init__(self):
        # Remembered now: the on-disk embedding cache stays readable after release_text_encoder().
        if self.pipe.text_encoder is not None:
            self._text_encoder_config = self.pipe.text_encoder.config.to_json_string()

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def expert_names(self) -> list[str]:
        return ["transformer", "transformer_2"] if self.variant == "a14b" else ["transformer"]

    def load_all_experts(self) -> dict:
        """Every expert, resident together, by name: what WanPipeline itself needs to sample (it switches experts
        mid-trajectory). For A14B in bf16 that is two 14B experts, about 57 GB; `only_expert` keeps one."""
        return {name: self.load_expert(name) for name in self.expert_names}

    def resident_experts(self) -> list[str]:
        return [name for name in self.expert_names if getattr(self.pipe, name, None) is not None]

    @property
    def boundary_timestep(self) -> float | None:
        ratio = self.pipe.config.boundary_ratio
        return None if ratio is None else ratio * self.pipe.scheduler.config.num_train_timesteps

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.pipe.config.expand_timesteps)

    def transformer_config(self, name: str = "transformer") -> dict:
        """An expert's config, read from disk when the expert is not resident."""
        module = getattr(self.pipe, name, None)
        if module is not None:
            return dict(module.config)
        from diffusers import WanTransformer3DModel

        return dict(WanTransformer3DModel.load_config(self.source, subfolder=name))

    @property
    def latent_channels(self) -> int:
        return self.transformer_config()["in_channels"]

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    def expert_for_timestep(self, t) -> str:
        """The expert WanPipeline uses at timestep t: t >= boundary -> high-noise `transformer`."""
        boundary = self.boundary_timestep
        name = "transformer" if boundary is None or float(t) >= boundary else "transformer_2"
        if name not in self.expert_names:
            # Never leave a sample unrouted (its output would be uninitialised memory).
            raise RuntimeError(f"timestep {float(t):g} belongs to expert {name!r}, which this {self.variant} teacher "
                               f"({self.source}) does not have: its model_index.json and experts disagree")
        return name

    def split_by_expert(self, timesteps) -> list[tuple[str, torch.Tensor]]:
        """(expert name, indices of the samples it handles) for a batch of timesteps, in `expert_names` order."""
        names = [self.expert_for_timestep(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
        groups = [(name, torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long))
                  for name in self.expert_names]
        return [(name, idx) for name, idx in groups if len(idx)]

    def expert_for_role(self, role: str) -> str:
        if role not in EXPERT_ROLES:
            raise ValueError(f"unknown expert role {role!r}: use high_noise or low_noise")
        return EXPERT_ROLES[role] if self.variant == "a14b" else "transformer"

    @property
    def uses_cfg(self) -> bool:
        """WanPipeline runs the unconditional pass only when guidance_scale > 1 (for both experts)."""
        return self.guidance_scale > 1

    def guidance_for_expert(self, name: str) -> float:
        """The expert's guidance scale; 1.0 (the conditional velocity) when CFG is off."""
        if not self.uses_cfg:
            return 1.0
        return self.guidance_scale_2 if name == "transformer_2" else self.guidance_scale

    @property
    def fingerprint(self) -> str:
        """Identifies what this teacher's targets depend on (files, variant, guidance, dtype); see TeacherInfo."""
        return _fingerprint(Path(self.source), self.variant, self.guidance_scale, self.guidance_scale_2, self.dtype)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """Single-frame latent shape (B, C, 1, H/s, W/s) for an image of height x width pixels."""
        multiple = self.vae_scale_factor * self.transformer_config()["patch_size"][-1]
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this teacher, got {height}x{width}")
        s = self.vae_scale_factor
        return (batch_size, self.latent_channels, 1, height // s, width // s)

    # --- memory ----------------------------------------------------------------------------------------------
    def load_expert(self, name: str):
        module = getattr(self.pipe, name, None)
        if module is None:
            from diffusers import WanTransformer3DModel

            if name not in self.expert_names:
                raise ValueError(f"this {self.variant} teacher has no expert {name!r}: it has {self.expert_names}")
            check_weight_files(Path(self.source) / name)
            with _quiet_dtype_deprecation():
                module = WanTransformer3DModel.from_pretrained(self.source, subfolder=name, torch_dtype=self.dtype)
            module = module.to(self._module_device()).eval().requires_grad_(False)
            setattr(self.pipe, name, module)
        return module

    def unload_expert(self, name: str) -> None:
        if getattr(self.pipe, name, None) is not None:
            setattr(self.pipe, name, None)
            _free_memory()

    @contextlib.contextmanager
    def only_expert(self, name: str):
        """Keep exactly one expert resident inside the block (the others are released first)."""
        for other in self.expert_names:
            if other != name:
                self.unload_expert(other)
        yield self.load_expert(name)

    def release_text_encoder(self) -> None:
        """Free the text encoder once the prompt embeddings are cached (UMT5-XXL is ~5.7 B parameters)."""
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder = None
            _free_memory()

    def _module_device(self) -> torch.device:
        return torch.device("cuda:0" if self.device == "balanced" else self.device)

    # --- text --------------------------------------------------------------------------------------------
    def _embed_cache_key(self, prompt: str) -> str:
        raw = json.dumps([self.source, self._text_encoder_config, str(self.dtype), MAX_SEQUENCE_LENGTH, prompt])
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def encode_prompts(self, prompts: list[str] | str, negative: str | None = None, *, keep: bool = True):
        """Prompt embeddings (B, MAX_SEQUENCE_LENGTH, text_dim), cached, exactly as WanPipeline.encode_prompt makes
        them.

        With `negative` (a negative prompt, "" for Wan's default), returns (prompt_embeds, negative_embeds).
        `keep=False` encodes without remembering the new embeddings here (a caller that stores them itself, such
        as the target cache for 100k prompts, would otherwise hold every one of them in memory twice).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        found = self._encode_missing(prompts + ([negative] if negative is not None else []), keep=keep)
        embeds = torch.cat([found[p] for p in prompts])
        if negative is None:
            return embeds
        return embeds, found[negative].expand(len(prompts), -1, -1).clone()

    def _embed_path(self, prompt: str) -> Path | None:
        return self.cache_dir / "prompt_embeds" / f"{self._embed_cache_key(prompt)}.safetensors" if self.cache_dir else None

    def _encode_missing(self, prompts: list[str], batch_size: int = 32, keep: bool = True) -> dict:
        """The embedding of each of `prompts` (from memory, the disk cache or the text encoder), by prompt."""
        from safetensors.torch import load_file, save_file

        found = {p: self._embed_cache[p] for p in prompts if p in self._embed_cache}
        missing = []
        for prompt in dict.fromkeys(prompts):
            path = self._embed_path(prompt)
            if prompt in found:
                continue
            if path is not None and path.is_file():
                found[prompt] = load_file(path)["prompt_embeds"]
            else:
                missing.append(prompt)
        if missing and self.pipe.text_encoder is None:
            raise RuntimeError(f"prompt {missing[0][:40]!r} is not cached and the text encoder was released: "
                               "encode all prompts before release_text_encoder()")
        for start in range(0, len(missing), batch_size):
            # One batched call: T5's relative-position bias is computed once per call, not once per prompt.
            chunk = missing[start:start + batch_size]
            with torch.no_grad():
                embeds, _ = self.pipe.encode_prompt(
                    chunk, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
                    device=self.pipe.text_encoder.device, dtype=self.dtype,
                )
            for prompt, embed in zip(chunk, embeds.cpu()):
                embed = embed[None].clone()
                found[prompt] = embed
                path = self._embed_path(prompt)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same prompt
                    save_file({"prompt_embeds": embed}, tmp)
                    os.replace(tmp, path)
        if keep:
            self._embed_cache.update(found)
        return found

    # --- velocity ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_velocity(self, name: str, latents, timestep, prompt_embeds) -> torch.Tensor:
        """One expert's velocity on single-frame latents (B, C, 1, H, W) at timesteps (B,), as float32 on the
        latents' device (the expert may live elsewhere, e.g. on a GPU while the sampler state stays on the CPU)."""
        expert = self.load_expert(name)
        device = next(expert.parameters()).device
        input_device = latents.device
        latents = latents.to(device, expert.dtype)
        timestep = torch.as_tensor(timestep, device=device).expand(latents.shape[0])
        if self.expand_timesteps:
            timestep = per_token_timesteps(timestep, latents.shape[2:], expert.config.patch_size)
        out = expert(hidden_states=latents, timestep=timestep,
                     encoder_hidden_states=prompt_embeds.to(device, expert.dtype), return_dict=False)[0]
        return out.float().to(input_device)

    @torch.no_grad()
    def expert_velocities(self, name: str, latents, timestep, prompt_embeds, negative_prompt_embeds=None, *,
                          capture_blocks: bool = False) -> ExpertVelocities:
        """The one teacher query: expert `name`'s conditional and unconditional velocity at (latents, timestep).

        Without `negative_prompt_embeds` no unconditional pass runs and v_uncond is v_cond, which makes every
        guided velocity the conditional one exactly (WanPipeline's behaviour when CFG is off). `capture_blocks`
        also returns the output of every transformer block in the conditional pass.
        """
        expert = self.load_expert(name)
        captured = []
        hooks = [block.register_forward_hook(lambda module, args, output: captured.append(output))
                 for block in expert.blocks] if capture_blocks else []
        try:
            v_cond = self.expert_velocity(name, latents, timestep, prompt_embeds)
        finally:
            for hook in hooks:
                hook.remove()
        v_uncond = v_cond if negative_prompt_embeds is None else self.expert_velocity(
            name, latents, timestep, negative_prompt_embeds)
        return ExpertVelocities(v_cond, v_uncond, captured if capture_blocks else None)

    @torch.no_grad()
    def query(self, latents, timesteps, prompt_embeds, negative_prompt_embeds, *,
              capture_blocks: bool = False) -> TeacherTargets:
        """Distillation targets at single-frame points (latents (B, C, H, W)), each sample on its expert.

        Returns the conditional and unconditional velocities (v_uncond = v_cond when CFG is off, as WanPipeline
        makes no unconditional pass then), each sample's guidance scale and, with `capture_blocks`, the
        teacher's block outputs (one (B, N, D) tensor per block), all on the latents' device.
        """
        v_cond, v_uncond = torch.empty_like(latents), torch.empty_like(latents)
        guidance = torch.empty(len(latents))
        blocks = None
        for name, idx in self.split_by_expert(timesteps):
            negative = negative_prompt_embeds[idx] if self.uses_cfg else None
            out = self.expert_velocities(name, latents[idx].unsqueeze(2), timesteps[idx], prompt_embeds[idx], negative,
                                         capture_blocks=capture_blocks)
            v_cond[idx] = out.v_cond[:, :, 0].to(latents.device)
            v_uncond[idx] = out.v_uncond[:, :, 0].to(latents.device)
            guidance[idx] = self.guidance_for_expert(name)
            if capture_blocks:
                if blocks is None:
                    blocks = [torch.empty(len(latents), *b.shape[1:], device=latents.device) for b in out.blocks]
                for target, block in zip(blocks, out.blocks):
                    target[idx] = block.float().to(latents.device)
        return TeacherTargets(v_cond, v_uncond, guidance, blocks)

    @torch.no_grad()
    def velocity(self, latents, timestep, prompt_embeds, negative_prompt_embeds=None, guidance=None) -> torch.Tensor:
        """The teacher's velocity, each sample routed to the expert WanPipeline would use at its timestep.

        With `negative_prompt_embeds`, returns the guided velocity `v_u + g (v_c - v_u)` where g is `guidance`
        or the chosen expert's own guidance scale (no unconditional pass when CFG is off, as in WanPipeline);
        without, the conditional velocity.
        """
        cfg = negative_prompt_embeds is not None and (guidance is not None or self.uses_cfg)
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(latents.shape[0])
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for name, idx in self.split_by_expert(timestep):
            negative = negative_prompt_embeds[idx] if cfg else None
            v = self.expert_velocities(name, latents[idx], timestep[idx], prompt_embeds[idx], negative)
            velocity = v.v_cond
            if cfg:
                g = self.guidance_for_expert(name) if guidance is None else guidance
                velocity = guided_velocity(v.v_cond, v.v_uncond, g)
            out[idx.to(out.device)] = velocity.to(out.device)
        return out

    # --- images ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images (B, 3, H, W) in [-1, 1] to normalised single-frame latents (B, C, 1, h, w)."""
        vae = self.pipe.vae
        dist = vae.encode(images[:, :, None].to(vae.device, vae.dtype)).latent_dist
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        return (dist.mode().float().cpu() - mean) / std


@contextlib.contextmanager
def _quiet_dtype_deprecation():
    # Recent diffusers renamed torch_dtype to dtype; torch_dtype works on every release we support.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_teacher(
    path_or_id: str | Path = "tiny",
    device_strategy: str = "auto",
    dtype: str | torch.dtype = "float32",
    *,
    teacher_on_cpu: bool = False,
    load_experts: bool = True,
    cache_dir: str | Path | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
) -> Teacher:
    """Load a Wan 2.x teacher with diffusers' WanPipeline.

    Parameters:
        path_or_id: a local diffusers Wan directory, a hub id (e.g. "Wan-AI/Wan2.2-T2V-A14B-Diffusers", read
            from the Hugging Face cache like diffusers does), or the embedded tiny teacher: "tiny"
            (= "tiny-a14b"), "tiny-ti2v-5b", "tiny-2.1".
        device_strategy: "auto", "cpu", "cuda", "gpu0" or "balanced" (see `plan_teacher_device`; under torchrun
            "cuda"/"auto" use cuda:LOCAL_RANK). Without a GPU every strategy falls back to the CPU with one warning.
        dtype: "float32", "float16" or "bfloat16".
        teacher_on_cpu: alias of device_strategy="cpu".
        load_experts: False defers loading the transformer experts (see `Teacher.only_expert`).
        cache_dir: where prompt embeddings are cached on disk (None: memory only).
        guidance_scale, guidance_scale_2: CFG scales of the high- and low-noise experts. Neither: Wan 2.2's
            reference scales (A14B 4.0 high-noise / 3.0 low-noise; TI2V-5B and 2.1 5.0). Only guidance_scale:
            both experts use it (as WanPipeline does). guidance_scale <= 1 turns CFG off.
    """
    info = read_teacher_info(path_or_id, guidance_scale, guidance_scale_2)
    torch_dtype = resolve_dtype(dtype)
    plan = teacher_device_plan(device_strategy, teacher_on_cpu)
    if not plan.loads_teacher:
        raise ValueError(f"teacher device strategy 'gpu0' keeps one teacher on GPU 0 for all ranks of this machine and "
                         f"local rank {local_ranks()[0]} must not load another copy: load it on local rank 0 only, or "
                         "use 'cuda' for one teacher per rank")
    pipe = _load_pipeline(info, torch_dtype, plan.device, load_experts)
    teacher = Teacher(
        pipe=pipe, source=str(info.source), variant=info.variant, device=plan.device, dtype=torch_dtype,
        guidance_scale=info.guidance_scale, guidance_scale_2=info.guidance_scale_2,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    logger.info("loaded %s teacher from %s on %s (%s)", info.variant, info.source, plan.device, torch_dtype)
    return teacher


def _load_pipeline(info: TeacherInfo, torch_dtype: torch.dtype, device: str, load_experts: bool):
    """The teacher's WanPipeline on `device`, in eval mode without gradients; its experts left out (None) unless
    `load_experts`. Every weight file is checked first, so a truncated one is a one-line error."""
    from diffusers import WanPipeline

    source = str(info.source)
    kwargs = {"torch_dtype": torch_dtype}
    components = [name for name in _components(info.index) if name not in ("transformer", "transformer_2")]
    if load_experts:
        components += info.expert_names
    else:
        kwargs.update(transformer=None, transformer_2=None)
    for name in components:
        check_weight_files(info.source / name)
    if device == "balanced":
        kwargs["device_map"] = "balanced"
    try:
        with _quiet_dtype_deprecation():
            pipe = WanPipeline.from_pretrained(source, **kwargs)
    except OSError as err:
        raise TeacherNotAvailableError(
            f"the teacher weights in {source} cannot be loaded ({str(err).splitlines()[0][:120]}): the checkpoint is "
            "incomplete; download it again and pass its local directory as teacher_path"
        ) from None
    if device != "balanced":
        pipe.to(device)
    for name in ("text_encoder", "vae", "transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe
