"""Wan's causal 3D VAE as the 2D image VAE it is on a single frame: exact, no Conv3d, a quarter of the cost.

At T=1 (Wan's "first chunk", which is every image) the 3D VAE degenerates in three ways:

- a causal `Conv3d` pads time with `2 * pad_t` zero frames *in front*, so only its last temporal tap meets
  the frame: it is a `Conv2d` with `weight[:, :, -1]` (a 1-tap conv keeps its only tap);
- temporal resampling is skipped on the first chunk: `WanResample`'s `time_conv` is never called (the
  encoder only fills its cache, the decoder marks it "Rep"), and `DupUp3D(first_chunk=True)` keeps only the
  last of the frames it makes;
- `AvgDown3D` (Wan 2.2) is *not* a no-op: it pads `factor_t - 1` zero frames in front and averages them in,
  so its 2D form keeps those zeros in the mean.

`WanVAE2D` takes the same config as the `AutoencoderKLWan` it came from and reuses diffusers' own Wan
encoder/decoder containers, whose forwards without a feature cache are shape-agnostic; only the leaves that
know about time are swapped for their T=1 equivalents below. Parameter names stay the same, so the weights
of a 3D VAE map over one to one (`vae_to_2d`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AvgDown3D, DupUp3D, WanAttentionBlock, WanCausalConv3d, WanResample, WanRMS_norm, patchify, unpatchify,
)
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

_WAN_DEFAULTS = {name: p.default for name, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
                 if name != "self"}


class WanAttention2D(WanAttentionBlock):
    """Wan's per-frame attention block (already 2D inside: its norm, qkv and projection are 2D) on images."""

    def forward(self, x):
        return super().forward(x.unsqueeze(2)).squeeze(2)


class WanResample2D(WanResample):
    """`WanResample` without its `time_conv`: only the spatial up/down-sampling acts on a first frame."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__(dim, mode.replace("3d", "2d"), upsample_out_dim)

    def forward(self, x, feat_cache=None, feat_idx=None):
        return self.resample(x)


class AvgDown2D(nn.Module):
    """`AvgDown3D` at T=1: pixel-unshuffle by `factor_s`, then the channel-group mean over `factor_t` time slots
    of which the causal padding made the first `factor_t - 1` zeros (they still count in the mean)."""

    def __init__(self, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.factor_s
        x = x.view(b, c, 1, h // s, s, w // s, s).permute(0, 1, 2, 4, 6, 3, 5)  # (b, c, t, s, s, h', w')
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 0, self.factor_t - 1, 0))  # zero time slots in front, as Wan pads
        return x.reshape(b, self.out_channels, -1, h // s, w // s).mean(2)


class DupUp2D(nn.Module):
    """`DupUp3D` at T=1: channel-repeat and pixel-shuffle by `factor_s`, keeping the last of the `factor_t`
    frames it would make, which is what Wan keeps on the first chunk."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def forward(self, x, first_chunk=None):  # an image is always Wan's first chunk
        b, _, h, w = x.shape
        s = self.factor_s
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_channels, self.factor_t, s, s, h, w)
        return x[:, :, -1].permute(0, 1, 4, 2, 5, 3).reshape(b, self.out_channels, h * s, w * s)


def _conv2d(conv: WanCausalConv3d) -> nn.Conv2d:
    # WanCausalConv3d keeps its spatial padding in `_padding` = (w, w, h, h, 2 * t, 0).
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[1:], stride=conv.stride[1:],
                     padding=(conv._padding[2], conv._padding[0]))


def _norm2d(norm: WanRMS_norm) -> nn.Module:
    if norm.gamma.dim() == 3:  # already an image norm (gain of shape (C, 1, 1))
        return norm
    return WanRMS_norm(norm.gamma.shape[0], channel_first=norm.channel_first, images=True,
                       bias=isinstance(norm.bias, nn.Parameter))


def _resample2d(resample: WanResample) -> WanResample2D:
    # Wan 2.1's upsamplers halve the channels, Wan 2.2's keep them: read it off the spatial conv.
    up_dim = resample.resample[-1].out_channels if "upsample" in resample.mode else None
    return WanResample2D(resample.dim, resample.mode, up_dim)


_TO_2D = {
    WanCausalConv3d: _conv2d,
    WanRMS_norm: _norm2d,
    WanAttentionBlock: lambda m: WanAttention2D(m.dim),
    WanResample: _resample2d,
    AvgDown3D: lambda m: AvgDown2D(m.out_channels, m.factor_t, m.factor_s),
    DupUp3D: lambda m: DupUp2D(m.in_channels, m.out_channels, m.factor_t, m.factor_s),
}


def _to_2d(module: nn.Module) -> nn.Module:
    """`module` with every time-aware leaf replaced by a fresh (untrained) T=1 equivalent, names unchanged."""
    convert = _TO_2D.get(type(module))
    if convert is not None:
        return convert(module)
    for name, child in module.named_children():
        setattr(module, name, _to_2d(child))
    return module


class WanVAE2D(ModelMixin, ConfigMixin):
    r"""
    The Wan VAE (2.1 or 2.2) on single images: equal to `AutoencoderKLWan` with a singleton time axis.

    Parameters:
        The `AutoencoderKLWan` config, unchanged, so the pipeline's latent conventions (`latents_mean`,
        `latents_std`, `z_dim`, `scale_factor_spatial`) read the same; see `AutoencoderKLWan` for each field.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        base_dim: int = 96,
        decoder_base_dim: int | None = None,
        z_dim: int = 16,
        dim_mult: list[int] = _WAN_DEFAULTS["dim_mult"],
        num_res_blocks: int = 2,
        attn_scales: list[float] = _WAN_DEFAULTS["attn_scales"],
        temperal_downsample: list[bool] = _WAN_DEFAULTS["temperal_downsample"],
        dropout: float = 0.0,
        latents_mean: list[float] = _WAN_DEFAULTS["latents_mean"],
        latents_std: list[float] = _WAN_DEFAULTS["latents_std"],
        is_residual: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: int | None = None,
        scale_factor_temporal: int | None = 4,
        scale_factor_spatial: int | None = 8,
    ) -> None:
        super().__init__()
        # The 3D VAE only lends its layout (on meta: its weights are never made); every leaf that holds
        # weights is rebuilt by _to_2d on the current device.
        with torch.device("meta"):
            layout = AutoencoderKLWan(**{k: v for k, v in self.config.items() if k in _WAN_DEFAULTS})
        self.encoder = _to_2d(layout.encoder)
        self.quant_conv = _to_2d(layout.quant_conv)
        self.post_quant_conv = _to_2d(layout.post_quant_conv)
        self.decoder = _to_2d(layout.decoder)
        self.spatial_compression_ratio = scale_factor_spatial

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images (B, 3, H, W) in [-1, 1] -> the posterior over latents (B, 2 * z_dim -> z_dim, H/s, W/s)."""
        if self.config.patch_size is not None:
            x = patchify(x.unsqueeze(2), self.config.patch_size).squeeze(2)
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Latents (B, z_dim, h, w), un-normalised as for `AutoencoderKLWan` -> images (B, 3, h*s, w*s)."""
        x = self.decoder(self.post_quant_conv(z))
        if self.config.patch_size is not None:
            x = unpatchify(x.unsqueeze(2), self.config.patch_size).squeeze(2)
        x = x.clamp(-1.0, 1.0)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None) -> DecoderOutput | tuple:
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


def vae_to_2d(vae: AutoencoderKLWan) -> WanVAE2D:
    """The 2D VAE equal to `vae` on single frames, with `vae`'s weights, dtype, device and train/eval mode."""
    with torch.device(vae.device):
        vae2d = WanVAE2D.from_config({k: v for k, v in vae.config.items() if not k.startswith("_")})
    weights3d = vae.state_dict()
    dropped = [name for name in weights3d if name not in vae2d.state_dict()]
    if not all(".time_conv." in name for name in dropped):
        raise ValueError(f"{type(vae).__name__} has weights WanVAE2D does not map: {dropped}")

    # A parameter with one more axis than its 2D counterpart has time at dim 2: a causal conv kernel, of which
    # only the last tap meets a single frame, or a norm gain broadcast over time (size 1: last = only entry).
    def at_one_frame(name, like):
        weight = weights3d[name]
        return weight[:, :, -1] if weight.dim() == like.dim() + 1 else weight

    vae2d.load_state_dict({name: at_one_frame(name, p) for name, p in vae2d.state_dict().items()})
    # nn.Module.to: ModelMixin.to warns about float32-pinned modules on any dtype cast, even with none pinned.
    return nn.Module.to(vae2d, vae.dtype).train(vae.training)
