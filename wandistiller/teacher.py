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

import torch

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
MAX_SEQUENCE_LENGTH = 512


class TeacherNotAvailableError(RuntimeError):
    """The teacher's weights cannot be found locally or downloaded."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of float32, float16, bfloat16")
    return DTYPES[dtype]


def resolve_device_strategy(strategy: str = "auto", teacher_on_cpu: bool = False) -> str:
    """Map a device strategy to what this machine can do: 'cpu', 'cuda:N' or 'balanced'."""
    if teacher_on_cpu:
        strategy = "cpu"
    if strategy not in DEVICE_STRATEGIES:
        raise ValueError(f"unknown device strategy {strategy!r}: use one of {', '.join(DEVICE_STRATEGIES)}")
    if strategy == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if strategy != "auto":
            warnings.warn(f"teacher device strategy {strategy!r} needs a GPU and none is visible: using the CPU")
        return "cpu"
    if strategy in ("cuda", "gpu0"):
        return "cuda:0"
    if strategy == "balanced":
        return "balanced"
    # auto: the GPU with the most free memory; accelerate's balanced map when there are several.
    if torch.cuda.device_count() > 1:
        return "balanced"
    return "cuda:0"


def resolve_teacher_path(path_or_id: str | Path) -> str:
    """The embedded tiny teacher's names map to its (built on first use) directory; anything else passes."""
    name = str(path_or_id)
    if name == "tiny" or (name.startswith("tiny-") and not Path(name).exists()):
        from .toy import VARIANTS, tiny_wan_path

        variant = "a14b" if name == "tiny" else name[len("tiny-"):]
        if variant not in VARIANTS:
            raise ValueError(f"unknown tiny teacher {name!r}: use tiny, " + ", ".join(f"tiny-{v}" for v in VARIANTS))
        return str(tiny_wan_path(variant))
    return name


def read_model_index(path: Path) -> dict:
    """Check that `path` is a diffusers Wan pipeline directory and return its model_index.json."""
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"{path} is not a diffusers pipeline directory (no model_index.json): "
                         "pass a Wan 2.x Diffusers checkpoint, e.g. a download of Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_path} is corrupt ({err}): re-download the checkpoint") from None
    if not isinstance(index, dict) or not str(index.get("_class_name", "")).startswith("Wan"):
        found = index.get("_class_name") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path} holds a {found} pipeline, not a Wan pipeline: pass a Wan 2.x Diffusers checkpoint")
    if not any(index.get(name) and index[name][0] for name in ("transformer", "transformer_2")):
        raise ValueError(f"{path} has no Wan transformer in model_index.json: the checkpoint is incomplete")
    return index


def detect_variant(index: dict) -> str:
    """'a14b' (two experts switched by timestep), 'ti2v-5b' (per-token timesteps, 48 channels) or '2.1'."""
    if index.get("boundary_ratio") is not None and index.get("transformer_2", [None])[0]:
        return "a14b"
    if index.get("expand_timesteps"):
        return "ti2v-5b"
    return "2.1"


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

    @property
    def experts(self) -> dict:
        """All experts, loading any that are not resident."""
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
        return "transformer" if boundary is None or float(t) >= boundary else "transformer_2"

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

    def guidance_for_expert(self, name: str) -> float:
        return self.guidance_scale_2 if name == "transformer_2" else self.guidance_scale

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

    def encode_prompts(self, prompts: list[str] | str, negative: str | None = None):
        """Prompt embeddings (B, 512, text_dim) exactly as WanPipeline.encode_prompt makes them, cached.

        With `negative` (a negative prompt, "" for Wan's default), returns (prompt_embeds, negative_embeds).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._encode_missing(prompts + ([negative] if negative is not None else []))
        embeds = torch.cat([self._embed_cache[p] for p in prompts])
        if negative is None:
            return embeds
        return embeds, self._embed_cache[negative].expand(len(prompts), -1, -1).clone()

    def _embed_path(self, prompt: str) -> Path | None:
        return self.cache_dir / "prompt_embeds" / f"{self._embed_cache_key(prompt)}.safetensors" if self.cache_dir else None

    def _encode_missing(self, prompts: list[str], batch_size: int = 32) -> None:
        from safetensors.torch import load_file, save_file

        missing = []
        for prompt in dict.fromkeys(prompts):
            path = self._embed_path(prompt)
            if prompt in self._embed_cache:
                continue
            if path is not None and path.is_file():
                self._embed_cache[prompt] = load_file(path)["prompt_embeds"]
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
                self._embed_cache[prompt] = embed
                path = self._embed_path(prompt)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same prompt
                    save_file({"prompt_embeds": embed}, tmp)
                    os.replace(tmp, path)

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
            # Wan 2.2 TI2V: one timestep per latent patch (all equal for text-to-image), as WanPipeline builds it.
            p_t, p_h, p_w = expert.config.patch_size
            tokens = (latents.shape[2] // p_t) * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
            timestep = timestep[:, None].expand(-1, tokens)
        out = expert(hidden_states=latents, timestep=timestep,
                     encoder_hidden_states=prompt_embeds.to(device, expert.dtype), return_dict=False)[0]
        return out.float().to(input_device)

    @torch.no_grad()
    def velocity(self, latents, timestep, prompt_embeds, negative_prompt_embeds=None, guidance=None) -> torch.Tensor:
        """The teacher's velocity, each sample routed to the expert WanPipeline would use at its timestep.

        With `negative_prompt_embeds`, returns the guided velocity `v_u + g (v_c - v_u)` where g is `guidance`
        or the chosen expert's own guidance scale; without, the conditional velocity.
        """
        timestep = torch.as_tensor(timestep, dtype=torch.float32).flatten().expand(latents.shape[0])
        out = torch.empty(latents.shape, dtype=torch.float32, device=latents.device)
        for name, idx in self.split_by_expert(timestep):
            v = self.expert_velocity(name, latents[idx], timestep[idx], prompt_embeds[idx])
            if negative_prompt_embeds is not None:
                g = self.guidance_for_expert(name) if guidance is None else guidance
                v_u = self.expert_velocity(name, latents[idx], timestep[idx], negative_prompt_embeds[idx])
                v = v_u + g * (v - v_u)
            out[idx.to(out.device)] = v.to(out.device)
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
        path_or_id: a local diffusers Wan directory, a hub id (e.g. "Wan-AI/Wan2.2-T2V-A14B-Diffusers"), or
            the embedded tiny teacher: "tiny" (= "tiny-a14b"), "tiny-ti2v-5b", "tiny-2.1".
        device_strategy: "auto", "cpu", "cuda", "gpu0" or "balanced" (accelerate device map over local GPUs).
            Without a GPU every strategy falls back to the CPU with one warning.
        dtype: "float32", "float16" or "bfloat16".
        teacher_on_cpu: alias of device_strategy="cpu".
        load_experts: False defers loading the transformer experts (see `Teacher.only_expert`).
        cache_dir: where prompt embeddings are cached on disk (None: memory only).
        guidance_scale, guidance_scale_2: CFG scales of the high- and low-noise experts (Wan's defaults).
    """
    from diffusers import WanPipeline

    source = resolve_teacher_path(path_or_id)
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"teacher path {local} is a file: pass the diffusers pipeline directory that holds model_index.json")
        index = read_model_index(local)
        source = str(local.resolve())
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"teacher path {source} does not exist: pass a local Wan Diffusers directory, "
                                "a hub id such as Wan-AI/Wan2.2-T2V-A14B-Diffusers, or 'tiny'")
    else:
        index = None
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device_strategy(device_strategy, teacher_on_cpu)
    kwargs = {"torch_dtype": torch_dtype}
    if not load_experts:
        kwargs.update(transformer=None, transformer_2=None)
    if device == "balanced":
        kwargs["device_map"] = "balanced"
    try:
        with _quiet_dtype_deprecation():
            pipe = WanPipeline.from_pretrained(source, **kwargs)
    except OSError as err:
        raise TeacherNotAvailableError(
            f"the teacher weights {source!r} are not available here ({str(err).splitlines()[0][:120]}): "
            "download the Diffusers checkpoint where you have internet and pass its local directory as teacher_path"
        ) from None
    if device != "balanced":
        pipe.to(device)
    for name in ("text_encoder", "vae", "transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    variant = detect_variant(index if index is not None else dict(pipe.config))
    default_g, default_g2 = DEFAULT_GUIDANCE[variant]
    teacher = Teacher(
        pipe=pipe, source=source, variant=variant, device=device, dtype=torch_dtype,
        guidance_scale=default_g if guidance_scale is None else guidance_scale,
        guidance_scale_2=(default_g2 if guidance_scale_2 is None else guidance_scale_2) if variant == "a14b" else None,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    logger.info("loaded %s teacher from %s on %s (%s)", variant, source, device, torch_dtype)
    return teacher
