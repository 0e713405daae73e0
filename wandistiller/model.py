"""Wan-Lite: a purely 2D text-to-image diffusion transformer built from Wan's own blocks.

The student keeps Wan's computation and drops its temporal axis: a Conv2d patch embedding, 2D rotary
embeddings, diffusers' `WanTransformerBlock` (adaLN modulation, self-attention with RMS qk-norm,
cross-attention to text, FFN) and `WanTimeTextImageEmbedding`, Wan's output head and a 2D unpatchify. With the
teacher-compatible RoPE layout (Wan's h/w frequencies, the former temporal dims left unrotated) a student
projected at full size computes exactly what the teacher computes on a single frame (see projection.py).

This file also holds the student *configuration* (the user-facing JSON in config/) and its translation into
model kwargs, checked against the teacher.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding, WanTransformerBlock
from diffusers.utils import BaseOutput, apply_lora_scale

from . import text_padding
from .flow import MAX_SEQUENCE_LENGTH

# Wan's RoPE base; the teacher hard-codes it, so a compatible student must use it too.
WAN_ROPE_THETA = 10000.0


def wan_rope_axes_dim(attention_head_dim: int) -> tuple[int, int]:
    """Wan's rotary split of a head into (h, w) dims; the remaining head_dim - h - w dims were temporal.

    For head_dim 128 this is (42, 42), leaving 44 dims that Wan rotates by frame index: at a single frame
    that rotation is the identity, so the student leaves them unrotated.
    """
    h = w = 2 * (attention_head_dim // 6)
    return h, w


# -----------------------------------------------------------------------------------------------------------
# Model


@dataclass
class WanLiteTransformerOutput(BaseOutput):
    """
    Parameters:
        sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The predicted flow-matching velocity.
        hidden_states (`tuple[torch.Tensor]`, *optional*):
            With `output_hidden_states=True`: each block's output, `(batch_size, num_patches, inner_dim)`.
    """

    sample: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class WanLiteRotaryPosEmbed2D(nn.Module):
    """2D rotary embedding in Wan's head layout: `[unrotated | h | w]`.

    Returns (freqs_cos, freqs_sin), each (1, num_patches, 1, head_dim), the format diffusers' WanAttnProcessor
    expects. The unrotated dims get cos=1, sin=0 - exactly what Wan's temporal dims get at frame 0. Frequencies
    are computed per call (in float64, as Wan does) so any resolution works and the module holds no buffers.
    """

    def __init__(self, attention_head_dim: int, patch_size: tuple[int, int], axes_dim: tuple[int, int], theta: float):
        super().__init__()
        h_dim, w_dim = axes_dim
        if h_dim % 2 or w_dim % 2 or h_dim + w_dim > attention_head_dim:
            raise ValueError(f"rope_axes_dim {tuple(axes_dim)} must be two even sizes summing to at most "
                             f"attention_head_dim={attention_head_dim}")
        self.patch_size = tuple(patch_size)
        self.unrotated_dim = attention_head_dim - h_dim - w_dim
        self.h_dim, self.w_dim = h_dim, w_dim
        self.theta = theta

    def _axis(self, dim: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if dim == 0:
            empty = torch.empty(length, 0, device=device)
            return empty, empty
        freqs_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        cos, sin = get_1d_rotary_pos_embed(dim, length, self.theta, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=freqs_dtype)
        return cos.to(device), sin.to(device)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, height, width = hidden_states.shape
        pph, ppw = height // self.patch_size[0], width // self.patch_size[1]
        device = hidden_states.device
        cos_h, sin_h = self._axis(self.h_dim, pph, device)
        cos_w, sin_w = self._axis(self.w_dim, ppw, device)
        ones = torch.ones(pph, ppw, self.unrotated_dim, device=device)

        def grid(unrotated, h, w):
            h = h[:, None, :].expand(pph, ppw, -1)
            w = w[None, :, :].expand(pph, ppw, -1)
            return torch.cat([unrotated, h, w], dim=-1).reshape(1, pph * ppw, 1, -1)

        return grid(ones, cos_h, cos_w), grid(torch.zeros_like(ones), sin_h, sin_w)


class WanLiteTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    r"""
    Wan-Lite: Wan's diffusion transformer for single images, with no temporal axis.

    What diffusers' `WanTransformer3DModel` offers its users comes from the same diffusers mixins: attention
    processors (`attn_processors`, `set_attn_processor`), attention backends (`set_attention_backend`), QKV
    fusion (`fuse_qkv_projections`), PEFT LoRA adapters (`add_adapter`, `save_lora_adapter`,
    `load_lora_adapter`; `attention_kwargs={"scale": s}` scales them) and the cache hooks (`enable_cache`,
    `cache_context`). Cross-attention skips the text's zero padding (`text_padding`) only while every block
    runs our padded-text processor on a backend that adds float masks; with any other processor or backend
    it attends over the full text, which is the same attention.

    Parameters:
        patch_size (`tuple[int, int]`, defaults to `(2, 2)`):
            Spatial patch size (h, w); must equal the teacher's spatial patch for projection.
        num_attention_heads (`int`, defaults to `12`):
            Number of attention heads.
        attention_head_dim (`int`, defaults to `128`):
            Channels per head (Wan uses 128); `inner_dim = num_attention_heads * attention_head_dim`.
        in_channels (`int`, defaults to `16`):
            Latent channels of the VAE (16 for the Wan 2.1 VAE, 48 for the Wan 2.2 VAE).
        out_channels (`int`, *optional*, defaults to `16`):
            Output (velocity) channels; `None` means `in_channels`.
        text_dim (`int`, defaults to `4096`):
            Width of the text-encoder embeddings (UMT5-XXL: 4096).
        freq_dim (`int`, defaults to `256`):
            Width of the sinusoidal timestep features.
        ffn_dim (`int`, defaults to `8960`):
            Hidden width of each block's feed-forward network.
        num_layers (`int`, defaults to `16`):
            Number of transformer blocks.
        cross_attn_norm (`bool`, defaults to `True`):
            Affine LayerNorm before cross-attention (as Wan).
        qk_norm (`str`, *optional*, defaults to `"rms_norm_across_heads"`):
            Query/key normalisation; Wan's block always normalises across all heads.
        eps (`float`, defaults to `1e-6`):
            Epsilon of the normalisation layers.
        rope_axes_dim (`tuple[int, int]`, *optional*, defaults to `None`):
            Rotary dims per head for the (h, w) axes; the rest of each head is not rotated. `None` uses Wan's
            layout (`2 * (head_dim // 6)` each), which a student projected from Wan needs to stay exact.
        rope_theta (`float`, defaults to `10000.0`):
            RoPE base frequency.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _no_split_modules = ["WanTransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _repeated_blocks = ["WanTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int] = (2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 16,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_axes_dim: tuple[int, int] | None = None,
        rope_theta: float = WAN_ROPE_THETA,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if len(patch_size) != 2:
            raise ValueError(f"patch_size must be (h, w) for this 2D model, got {patch_size}")
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        axes_dim = tuple(rope_axes_dim) if rope_axes_dim is not None else wan_rope_axes_dim(attention_head_dim)

        # 1. Patch & position embedding
        self.rope = WanLiteRotaryPosEmbed2D(attention_head_dim, patch_size, axes_dim, rope_theta)
        self.patch_embedding = nn.Conv2d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        # 2. Timestep and text conditioning (Wan's own embedder; no image branch for text-to-image)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim,
        )

        # 3. Transformer blocks (Wan's own)
        self.blocks = nn.ModuleList([
            WanTransformerBlock(inner_dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)
        ])

        # 4. Output norm & projection (adaLN shift/scale from the time embedding, as Wan)
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        # Cross-attention skips the text's zero padding (same attention, far fewer rows): see text_padding.
        text_padding.install(self.blocks)

    @classmethod
    def from_student_config(cls, student_config, teacher_config=None, *, seed: int | None = None):
        """A freshly (randomly) initialised student from a student config (dict, JSON path or StudentConfig).

        `teacher_config` (a WanTransformer3DModel config or the model itself) fills in and checks the values
        that must match the teacher; see `student_model_config`. `seed` makes the initialisation reproducible.
        """
        kwargs = student_model_config(student_config, teacher_config)
        if seed is None:
            return cls(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(**kwargs)

    def _conditioning(self, timestep, encoder_hidden_states):
        """Time embedding (for the head), per-block modulation and embedded text, as Wan computes them."""
        # timestep: (B,) or per-token (B, N) as Wan 2.2 TI2V uses
        ts_seq_len = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, encoder_hidden_states, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=ts_seq_len
        )
        if ts_seq_len is not None:
            timestep_proj = timestep_proj.unflatten(2, (6, -1))  # B, N, 6, D
        else:
            timestep_proj = timestep_proj.unflatten(1, (6, -1))  # B, 6, D
        return temb, timestep_proj, encoder_hidden_states

    def _output_head(self, hidden_states, temb):
        if temb.ndim == 3:  # per-token: B, N, D
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:  # B, D
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        return self.proj_out(hidden_states)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, p_h * p_w * C) patch tokens -> (B, C, H, W), in the (p_h, p_w, C) order Wan's head uses."""
        p_h, p_w = self.config.patch_size
        batch_size = tokens.shape[0]
        x = tokens.reshape(batch_size, height // p_h, width // p_w, p_h, p_w, -1)
        x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, H/p, p_h, W/p, p_w
        return x.reshape(batch_size, -1, height, width)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        output_hidden_states: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> WanLiteTransformerOutput | tuple:
        """
        The [`WanLiteTransformer2DModel`] forward method.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Noisy latents.
            timestep (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, num_patches)`):
                Flow-matching timesteps (`wandistiller.flow`); per patch for Wan 2.2 TI2V-style conditioning.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, sequence_len, text_dim)`):
                Text-encoder embeddings (Wan: UMT5, zero-padded to `flow.MAX_SEQUENCE_LENGTH` tokens).
            return_dict (`bool`, defaults to `True`):
                Return a [`WanLiteTransformerOutput`] instead of a tuple.
            output_hidden_states (`bool`, defaults to `False`):
                Also return every block's output (for feature distillation).
            attention_kwargs (`dict`, *optional*):
                As in diffusers' Wan transformer: `{"scale": s}` scales the LoRA adapters for this call.

        Returns:
            [`WanLiteTransformerOutput`], or the tuple `(sample,)` / `(sample, hidden_states)`.
        """
        if hidden_states.ndim != 4:
            raise ValueError(f"WanLiteTransformer2DModel takes latents (B, C, H, W), got shape "
                             f"{tuple(hidden_states.shape)}; for single-frame Wan latents (B, C, 1, H, W) pass "
                             "latents.squeeze(2)")
        _, _, height, width = hidden_states.shape
        p_h, p_w = self.config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"latent height and width must be multiples of patch_size {(p_h, p_w)}, got {height}x{width}")

        rotary_emb = self.rope(hidden_states)
        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        text_processors = [block.attn2.processor for block in self.blocks]
        encoder_hidden_states = text_padding.compact_for(text_processors, encoder_hidden_states)
        temb, timestep_proj, encoder_hidden_states = self._conditioning(timestep, encoder_hidden_states)

        block_outputs = []
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, encoder_hidden_states, timestep_proj, rotary_emb)
            else:
                tokens = block(tokens, encoder_hidden_states, timestep_proj, rotary_emb)
            if output_hidden_states:
                block_outputs.append(tokens)

        sample = self.unpatchify(self._output_head(tokens, temb), height, width)
        hidden = tuple(block_outputs) if output_hidden_states else None
        if not return_dict:
            return (sample,) if hidden is None else (sample, hidden)
        return WanLiteTransformerOutput(sample=sample, hidden_states=hidden)


# -----------------------------------------------------------------------------------------------------------
# Student configuration (config/student_config*.json) -> model kwargs


@dataclass
class StudentConfig:
    """The user-facing student description (config/student_config.json; keys documented in config/README.md).

    Size keys: `hidden_size`, `depth`, `num_heads`, `ffn_dim`. Keys that must match the teacher
    (`num_channels`, `patch_size`, `text_encoder_output_dim`) may be left out (None): they are then taken
    from the teacher. `image_size` (pixels) is for pipelines and data, not weights. `text_max_length` must be
    `flow.MAX_SEQUENCE_LENGTH` (512): the student sees the prompt embeddings WanPipeline pads to that length.
    """

    hidden_size: int = 1536
    depth: int = 16
    num_heads: int = 12
    ffn_dim: int | None = None
    num_channels: int | None = None
    patch_size: int | tuple[int, int] | None = None
    text_encoder_output_dim: int | None = None
    image_size: int = 1024
    text_max_length: int = MAX_SEQUENCE_LENGTH
    rope_axes_dim: tuple[int, int] | None = None
    # Accepted so that configs written for the original tool load; Wan-Lite does not use them.
    projection_factor: float = 1.0
    model_type: str = "WanLiteStudent"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_student_config(config: StudentConfig | dict | str | Path) -> StudentConfig:
    """A `StudentConfig` from a StudentConfig, a dict, or a path to a JSON file (keys as in config/).

    Unknown keys raise (a typo such as `hiden_size` would otherwise be silently ignored); keys starting with
    "_" are comments and are skipped.
    """
    if isinstance(config, StudentConfig):
        return config
    if isinstance(config, (str, Path)):
        config = _read_student_config_file(Path(config))
    if not isinstance(config, dict):
        raise TypeError(f"student config must be a StudentConfig, dict or JSON path, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(StudentConfig)}
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown student config key(s) {unknown}; known keys: {sorted(known)}")
    for name in ("hidden_size", "depth", "num_heads", "ffn_dim", "image_size", "text_max_length"):
        value = values.get(name)
        if name in values and not (name == "ffn_dim" and value is None) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"student config {name}={value!r} must be a positive whole number")
    text_length = values.get("text_max_length", MAX_SEQUENCE_LENGTH)
    if text_length != MAX_SEQUENCE_LENGTH:
        raise ValueError(f"student config text_max_length={text_length!r} contradicts the teacher: WanPipeline pads "
                         f"every prompt to {MAX_SEQUENCE_LENGTH} tokens; set text_max_length to {MAX_SEQUENCE_LENGTH} "
                         "or leave it out")
    hidden_size = values.get("hidden_size", StudentConfig.hidden_size)
    num_heads = values.get("num_heads", StudentConfig.num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"student config hidden_size={hidden_size} is not divisible by num_heads={num_heads}: choose "
                         "num_heads that divides hidden_size")
    return StudentConfig(**values)


def _read_student_config_file(path: Path) -> dict:
    """A student config JSON file; a missing or broken one is a one-line error naming the file (and position)."""
    if not path.is_file():
        raise FileNotFoundError(f"student config {path} does not exist: pass a JSON file such as "
                                "config/student_config_small.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is corrupt: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); "
                         "fix the file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is corrupt: not UTF-8 text (byte {err.start}); fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object of student config keys: write "
                         '{"hidden_size": ..., "depth": ..., "num_heads": ...}')
    return config


def _teacher_config_dict(teacher_config) -> dict | None:
    if teacher_config is None:
        return None
    if hasattr(teacher_config, "config") and not isinstance(teacher_config, dict):
        teacher_config = teacher_config.config  # a WanTransformer3DModel
    return dict(teacher_config)


def _spatial_patch(patch_size) -> tuple[int, int] | None:
    if patch_size is None:
        return None
    if isinstance(patch_size, int):
        return (patch_size, patch_size)
    patch_size = tuple(patch_size)
    return patch_size[-2:] if len(patch_size) == 3 else patch_size


def _must_match(name: str, value, teacher_value, why: str):
    """The student's `value` for `name`, or the teacher's when unset; a contradiction is a one-line error."""
    if value is None or teacher_value is None:
        return teacher_value if value is None else value
    if value != teacher_value:
        raise ValueError(f"student config {name}={value!r} contradicts the teacher: {why} {teacher_value!r}; "
                         f"set {name} to {teacher_value!r} or leave it out")
    return value


def student_model_config(student_config, teacher_config=None) -> dict:
    """Kwargs for `WanLiteTransformer2DModel` from a student config, checked against the teacher.

    Parameters:
        student_config: a `StudentConfig`, dict or JSON path (see `load_student_config`).
        teacher_config: the teacher expert's `WanTransformer3DModel` config (or the model), or None for a
            standalone student (then unset teacher-bound keys take Wan's defaults: 16 channels, patch 2,
            text_dim 4096).

    Latent channels, spatial patch size, text width, timestep-feature width and norm settings come from the
    teacher; a student value that contradicts it raises `ValueError` naming the value the teacher needs.
    `ffn_dim` defaults to the teacher's FFN/width ratio times `hidden_size`, rounded to a multiple of 64.
    """
    cfg = load_student_config(student_config)
    teacher = _teacher_config_dict(teacher_config)
    defaults = {name: p.default for name, p in inspect.signature(WanLiteTransformer2DModel.__init__).parameters.items()}
    t = teacher or {}

    in_channels = _must_match("num_channels", cfg.num_channels, t.get("in_channels"),
                              "its VAE latents have") or defaults["in_channels"]
    patch_size = _must_match("patch_size", _spatial_patch(cfg.patch_size), _spatial_patch(t.get("patch_size")),
                             "Wan patchifies latents (h, w) with") or tuple(defaults["patch_size"])
    text_dim = _must_match("text_encoder_output_dim", cfg.text_encoder_output_dim, t.get("text_dim"),
                           "its text encoder outputs width") or defaults["text_dim"]

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"student config hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_heads}")
    if cfg.depth < 1:
        raise ValueError(f"student config depth={cfg.depth} must be at least 1")
    ffn_dim = cfg.ffn_dim
    if ffn_dim is None:
        ratio = t["ffn_dim"] / (t["num_attention_heads"] * t["attention_head_dim"]) if teacher else 13824 / 5120  # A14B's
        multiple = 64 if cfg.hidden_size >= 256 else 1  # hardware-friendly widths, except for toy students
        ffn_dim = max(multiple, round(cfg.hidden_size * ratio / multiple) * multiple)

    return dict(
        patch_size=tuple(patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=in_channels,
        out_channels=t.get("out_channels") or in_channels,
        text_dim=text_dim,
        freq_dim=t.get("freq_dim", defaults["freq_dim"]),
        ffn_dim=ffn_dim,
        num_layers=cfg.depth,
        cross_attn_norm=t.get("cross_attn_norm", defaults["cross_attn_norm"]),
        qk_norm=t.get("qk_norm", defaults["qk_norm"]),
        eps=t.get("eps", defaults["eps"]),
        rope_axes_dim=tuple(cfg.rope_axes_dim) if cfg.rope_axes_dim is not None else None,
    )
