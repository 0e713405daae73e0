"""Wan's flow-matching conventions, in one place; every other module imports them from here.

They are those of Wan and of diffusers' flow-matching schedulers (FlowMatchEulerDiscrete, and UniPCMultistep
with ``use_flow_sigmas=True``):

* a timestep ``t`` in ``[0, NUM_TRAIN_TIMESTEPS)`` has noise level ``sigma = t / NUM_TRAIN_TIMESTEPS``
  (t = 0 is clean, t -> NUM_TRAIN_TIMESTEPS pure noise);
* the noisy latent is ``x_t = (1 - sigma) * x0 + sigma * noise`` and the transformer predicts the velocity
  ``v = noise - x0``; a sampler step is ``x_next = x_t + (sigma_next - sigma) * v``, hence
  ``x0 = x_t - sigma * v`` and ``noise = x_t + (1 - sigma) * v``;
* Wan's flow shift moves noise levels towards 1 for shift > 1: ``shift * s / (1 + (shift - 1) * s)``;
* Wan 2.2 A14B's two experts split the timesteps at ``boundary = boundary_ratio * NUM_TRAIN_TIMESTEPS``:
  WanPipeline runs the high-noise ``transformer`` at ``t >= boundary``, the low-noise ``transformer_2`` below;
* classifier-free guidance is ``v_uncond + g * (v_cond - v_uncond)``;
* Wan 2.2 TI2V-5B takes one timestep per latent patch (``expand_timesteps``), all equal for text-to-image;
* text embeddings are zero-padded to ``MAX_SEQUENCE_LENGTH`` tokens (WanPipeline's max_sequence_length).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000  # `num_train_timesteps` of Wan's schedulers
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default `max_sequence_length`: the text length every expert sees
DEFAULT_FLOW_SHIFT = 3.0  # Wan 2.2 at 480p (5.0 at 720p), for a scheduler config that names none


def sigma_from_timestep(timestep):
    """Noise level of a timestep: ``t / NUM_TRAIN_TIMESTEPS``."""
    return timestep / NUM_TRAIN_TIMESTEPS


def timestep_from_sigma(sigma):
    """The timestep of a noise level: ``sigma * NUM_TRAIN_TIMESTEPS``."""
    return sigma * NUM_TRAIN_TIMESTEPS


def few_step_sigmas(num_steps: int) -> torch.Tensor:
    """The noise levels a few-step (reflowed) student's sampler visits in `num_steps` Euler steps: 1, 1 - 1/n, ...,
    1/n (float64), then 0. They hold those of every step count dividing n (8 steps visit 4 steps' levels)."""
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:-1]


def shift_sigma(sigma, shift: float):
    """Wan's flow shift (``flow_shift`` of its scheduler): moves noise levels towards 1 for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma, shift: float):
    """Inverse of `shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def scheduler_shift(scheduler_config) -> float:
    """The flow shift a scheduler config uses (`DEFAULT_FLOW_SHIFT` when it names none)."""
    return scheduler_config.get("flow_shift", DEFAULT_FLOW_SHIFT) or DEFAULT_FLOW_SHIFT


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast over the non-batch dimensions of ``like`` (in its dtype)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Noisy latent at ``timestep`` (B,): ``x_t = (1 - sigma) * x0 + sigma * noise``, any latent rank."""
    sigma = per_sample(sigma_from_timestep(timestep), x0)
    return (1 - sigma) * x0 + sigma * noise


def per_token_timesteps(timestep: torch.Tensor, latent_size: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """(B,) timesteps repeated for every latent patch, (B, num_patches), as WanPipeline feeds Wan 2.2 TI2V.

    `latent_size` and `patch_size` name the same axes: (frames, height, width) for a Wan expert, (height,
    width) for the 2D student.
    """
    if len(latent_size) != len(patch_size):
        raise ValueError(f"latent size {tuple(latent_size)} and patch size {tuple(patch_size)} name different axes")
    tokens = math.prod(size // patch for size, patch in zip(latent_size, patch_size))
    return timestep[:, None].expand(-1, tokens)


def expert_timestep_range(role: str, boundary: float | None) -> tuple[float, float]:
    """The half-open range ``[low, high)`` of timesteps an expert serves in WanPipeline.

    High noise: ``[boundary, NUM_TRAIN_TIMESTEPS)``; low noise: ``[0, boundary)``; a teacher without a
    boundary, or ``role="mean"`` (both experts), covers ``[0, NUM_TRAIN_TIMESTEPS)``.
    """
    if role not in ("high_noise", "low_noise", "mean"):
        raise ValueError(f"unknown expert role {role!r}: use high_noise, low_noise or mean")
    if boundary is None or role == "mean":
        return 0.0, float(NUM_TRAIN_TIMESTEPS)
    return (float(boundary), float(NUM_TRAIN_TIMESTEPS)) if role == "high_noise" else (0.0, float(boundary))


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free-guided velocity ``v_uncond + g * (v_cond - v_uncond)``.

    ``guidance_scale`` is a float or a (B,) tensor: per-sample scales are needed because Wan 2.2 A14B uses
    ``guidance_scale`` on its high-noise expert and ``guidance_scale_2`` on the low-noise one, and one batch
    mixes both ranges.
    """
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = per_sample(guidance_scale.to(v_cond.device), v_cond)
    return v_uncond + guidance_scale * (v_cond - v_uncond)
