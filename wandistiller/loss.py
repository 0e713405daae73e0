"""The distillation objective: the student matches the teacher's flow-matching velocity.

The flow-matching conventions (noise levels, the shift, noising, guidance) are `wandistiller.flow`'s. Everything
here is pure torch: the teacher's outputs arrive as tensors, so the loss never needs a teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .flow import (
    DEFAULT_FLOW_SHIFT, NUM_TRAIN_TIMESTEPS, add_noise, few_step_sigmas, guided_velocity, shift_sigma,
    sigma_from_timestep, timestep_from_sigma, unshift_sigma,
)

TIMESTEP_DISTRIBUTIONS = ("shifted_uniform", "uniform", "logit_normal")
WEIGHTINGS = ("none", "min_snr", "cosmap")
MIN_SNR_GAMMA = 5.0


class NonFiniteLossError(RuntimeError):
    """A loss part became NaN or infinite; training cannot continue from this state."""


# --- timesteps and noising -------------------------------------------------------------------------------


def _sigma_cdf(sigma: torch.Tensor, distribution: str, shift: float) -> torch.Tensor:
    """CDF of the noise-level distribution: maps sigma in [0, 1] to a quantile in [0, 1]."""
    if distribution == "uniform":
        return sigma
    if distribution == "shifted_uniform":
        return unshift_sigma(sigma, shift)
    return torch.special.ndtr(torch.logit(sigma))


def _sigma_quantile(u: torch.Tensor, distribution: str, shift: float) -> torch.Tensor:
    """Inverse CDF of the noise-level distribution."""
    if distribution == "uniform":
        return u
    if distribution == "shifted_uniform":
        return shift_sigma(u, shift)
    return torch.sigmoid(torch.special.ndtri(u))


def _generator_device(generator: torch.Generator | None) -> torch.device:
    """The device random numbers must be drawn on to use ``generator`` (CPU when there is none)."""
    return generator.device if generator is not None else torch.device("cpu")


def sample_timesteps(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shift: float = DEFAULT_FLOW_SHIFT,
    distribution: str = "shifted_uniform",
    low: float = 0,
    high: float = NUM_TRAIN_TIMESTEPS,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``batch_size`` float timesteps in ``[low, high)``.

    Parameters:
        distribution: the noise level ``sigma`` of a timestep (`flow.sigma_from_timestep`) is
            ``"shifted_uniform"``: ``u ~ U(0, 1)`` passed through Wan's flow shift (as the scheduler spaces
            its sampling steps, so training sees noise levels in the proportion sampling visits them);
            ``"uniform"``: ``sigma ~ U(0, 1)``;
            ``"logit_normal"``: ``sigma = sigmoid(n)``, ``n ~ N(0, 1)`` (SD3).
        shift: flow shift for ``"shifted_uniform"`` (Wan 2.2 uses 3.0 at 480p, 5.0 at 720p); ignored otherwise.
        low, high: restrict timesteps to this range, e.g. ``flow.expert_timestep_range("high_noise", boundary)``
            to train on the high-noise expert's range only. The result follows the chosen distribution truncated
            to the range (sampled by inverse CDF), not a rescaled copy of it.
    """
    if distribution not in TIMESTEP_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {TIMESTEP_DISTRIBUTIONS}, got {distribution!r}")
    if not 0 <= low < high <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"need 0 <= low < high <= {NUM_TRAIN_TIMESTEPS}, got low={low}, high={high}")
    # float64 keeps the quantile transforms accurate near sigma=1, where the shift and the sigmoid saturate.
    bounds = sigma_from_timestep(torch.tensor([low, high], dtype=torch.float64))
    u_low, u_high = _sigma_cdf(bounds, distribution, shift).tolist()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=_generator_device(generator))
    sigma = _sigma_quantile(u_low + (u_high - u_low) * u, distribution, shift)
    timesteps = timestep_from_sigma(sigma).float()
    # Rounding to float32 can land exactly on `high`; the interval is half-open like the scheduler's.
    below_high = torch.nextafter(torch.tensor(float(high)), torch.tensor(float(low)))
    return timesteps.clamp(min=low, max=below_high.item()).to(device)


def reflow_timesteps(batch_size: int, *, generator: torch.Generator | None = None, sampler_steps: int = 0,
                     pure_noise: float = 0.0) -> torch.Tensor:
    """Reflow's ``batch_size`` float timesteps. ``sampler_steps=0``: noise levels ``sigma ~ U(0, 1)``
    (`sample_timesteps`, "uniform"); n: drawn evenly from the n levels the few-step sampler visits at n steps
    (`flow.few_step_sigmas`), the only inputs it ever gives the student. Then each row is at pure noise (sigma 1,
    the first step, which lays out the picture) with probability `pure_noise` instead."""
    device = _generator_device(generator)
    if sampler_steps:
        levels = timestep_from_sigma(few_step_sigmas(sampler_steps)).float().to(device)
        timesteps = levels[torch.randint(sampler_steps, (batch_size,), generator=generator, device=device)]
    else:
        timesteps = sample_timesteps(batch_size, generator=generator, distribution="uniform")
    if pure_noise > 0:
        top = torch.rand(batch_size, generator=generator, device=device) < pure_noise
        timesteps = timesteps.masked_fill(top, float(NUM_TRAIN_TIMESTEPS))
    return timesteps


# --- targets and losses -----------------------------------------------------------------------------------


def reflow_targets(x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow's (reflow's) training point for pairs (x0, noise), such as a teacher trajectory's final latent
    and the noise it started from: the straight path's point at `timestep`, ``x_t = (1 - sigma) * x0 + sigma *
    noise`` (`flow.add_noise`), and its constant velocity ``noise - x0`` (Wan's convention, what the student
    predicts). A student that learns these paths samples in a few Euler steps."""
    return add_noise(x0, noise, timestep), noise - x0


def _min_snr_mean() -> float:
    """Mean over sigma ~ U(0, 1) of ``min((1 - sigma)^2, gamma * sigma^2)`` (closed form)."""
    crossover = 1 / (1 + math.sqrt(MIN_SNR_GAMMA))
    return (MIN_SNR_GAMMA * crossover**3 + (1 - crossover) ** 3) / 3


def timestep_weight(timestep: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample loss weight, normalised so its mean over uniformly drawn noise levels is 1.

    The fixed normalisation (rather than dividing by the batch mean) keeps a sample's weight independent of
    its batch, so one process and several data-parallel ranks optimise the same objective.

    Parameters:
        weighting:
            ``"none"``: every timestep counts the same; plain velocity MSE, as Wan is trained.
            ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023, gamma=5) written for velocity: the error of the
            implied clean latent, ``sigma^2 * |v err|^2``, weighted by ``min(SNR, gamma)`` with
            ``SNR = ((1 - sigma) / sigma)^2``. Down-weights the nearly clean and the nearly pure-noise ends.
            ``"cosmap"``: SD3's weighting, ``2 / (pi * (1 - 2 sigma + 2 sigma^2))``; favours mid noise levels.
    """
    sigma = sigma_from_timestep(timestep.float())
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "min_snr":
        return torch.minimum((1 - sigma) ** 2, MIN_SNR_GAMMA * sigma**2) / _min_snr_mean()
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))  # already has mean exactly 1
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def velocity_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timestep: torch.Tensor | None = None,
    weighting: str = "none",
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, optionally weighted per timestep.

    ``reduction="mean"`` returns a scalar; ``"none"`` returns the (B,) per-sample losses (already weighted).
    The error is computed in float32 so bf16 predictions do not lose the small differences late in training.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weighting != "none":
        if timestep is None:
            raise ValueError(f"weighting={weighting!r} needs the timesteps")
        per_sample = per_sample * timestep_weight(timestep.to(per_sample.device), weighting)
    return per_sample.mean() if reduction == "mean" else per_sample


# --- feature distillation ---------------------------------------------------------------------------------


class FeatureAdapters(nn.Module):
    """One learned linear map per distilled block pair, from student width to teacher width.

    Initialised to the identity on the first ``student_dim`` teacher channels, or on ``channels`` (the teacher
    channel each student channel was projected from; exactly the identity when the widths match), so a student projected from the teacher starts with a meaningful feature loss instead of
    one dominated by a random projection.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_pairs: int, channels: Sequence[int] | None = None):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(num_pairs))
        for adapter in self.adapters:
            nn.init.zeros_(adapter.bias)
            if channels is None:
                nn.init.eye_(adapter.weight)
            else:
                # Student channel j was projected from teacher channel channels[j]: map it back there.
                nn.init.zeros_(adapter.weight)
                with torch.no_grad():
                    adapter.weight[torch.as_tensor(channels), torch.arange(student_dim)] = 1.0

    def __len__(self) -> int:
        return len(self.adapters)

    def forward(self, pair_index: int, student_feature: torch.Tensor) -> torch.Tensor:
        """Map the student feature of block pair ``pair_index`` into teacher space."""
        return self.adapters[pair_index](student_feature)


def feature_loss(
    student_feats: Sequence[torch.Tensor],
    teacher_feats: Sequence[torch.Tensor],
    adapters: FeatureAdapters,
    block_map: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Mean over block pairs of the MSE between adapted student and teacher block outputs.

    ``block_map[k] = (student_block, teacher_block)`` indexes the feature lists (each (B, N, D)), and pair k
    uses ``adapters[k]``. Teacher features are targets only: no gradient flows into them.
    """
    if len(block_map) != len(adapters):
        raise ValueError(f"block_map has {len(block_map)} pairs but there are {len(adapters)} adapters")
    losses = []
    for k, (s, t) in enumerate(block_map):
        adapted, target = adapters(k, student_feats[s]), teacher_feats[t].detach()
        if adapted.shape != target.shape:
            raise ValueError(
                f"pair {k} (student block {s}, teacher block {t}): adapted student feature "
                f"{tuple(adapted.shape)} does not match teacher feature {tuple(target.shape)}"
            )
        losses.append((adapted.float() - target.float()).pow(2).mean())
    return torch.stack(losses).mean()


# --- the combined objective -------------------------------------------------------------------------------


class DistillLoss(nn.Module):
    """Velocity KD, optionally CFG-distilled, plus optional feature KD.

    Holds the feature adapters, so ``distill_loss.parameters()`` are the loss's trainable parameters and
    belong in the optimiser next to the student's.

    Parameters:
        velocity_weight: weight of the velocity term.
        feature_weight: weight of the feature term; 0 disables feature KD.
        cfg_distill: when True the target is the teacher's guided velocity, so the student learns to produce
            guided images in a single (unguided) call; otherwise the conditional velocity.
        weighting: per-timestep weighting of the velocity term (see `timestep_weight`).
        adapters, block_map: the feature adapters and (student_block, teacher_block) pairs; needed when
            ``feature_weight > 0``.
    """

    def __init__(
        self,
        velocity_weight: float = 1.0,
        feature_weight: float = 0.0,
        cfg_distill: bool = False,
        weighting: str = "none",
        adapters: FeatureAdapters | None = None,
        block_map: Sequence[tuple[int, int]] | None = None,
    ):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if feature_weight > 0 and (adapters is None or block_map is None):
            raise ValueError("feature_weight > 0 needs adapters and block_map")
        self.velocity_weight = velocity_weight
        self.feature_weight = feature_weight
        self.cfg_distill = cfg_distill
        self.weighting = weighting
        self.adapters = adapters
        self.block_map = list(block_map) if block_map is not None else None

    def target(
        self,
        teacher_cond: torch.Tensor,
        teacher_uncond: torch.Tensor | None = None,
        guidance: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The velocity the student is trained to produce (detached: the teacher is never trained)."""
        if not self.cfg_distill:
            return teacher_cond.detach()
        if teacher_uncond is None or guidance is None:
            raise ValueError("cfg_distill=True needs teacher_uncond and guidance")
        return guided_velocity(teacher_cond.detach(), teacher_uncond.detach(), guidance)

    def forward(
        self,
        student_pred: torch.Tensor,
        teacher_cond: torch.Tensor,
        teacher_uncond: torch.Tensor | None = None,
        guidance: float | torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        student_feats: Sequence[torch.Tensor] | None = None,
        teacher_feats: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, "velocity": ..., "feature": ...}``; parts are unweighted scalars.

        ``"feature"`` is a zero tensor when feature KD is off, so every step logs the same keys.
        """
        target = self.target(teacher_cond, teacher_uncond, guidance)
        velocity = velocity_loss(student_pred, target, timestep, self.weighting)
        if self.feature_weight > 0:
            if student_feats is None or teacher_feats is None:
                raise ValueError("feature_weight > 0 needs student_feats and teacher_feats")
            feature = feature_loss(student_feats, teacher_feats, self.adapters, self.block_map)
        else:
            feature = velocity.new_zeros(())
        total = self.velocity_weight * velocity + self.feature_weight * feature
        return {"loss": total, "velocity": velocity, "feature": feature}


def non_finite_message(step: int, detail: str) -> str:
    """The one-line report of a non-finite loss at `step`, with `detail` (which parts, which ranks)."""
    return (f"non-finite loss at step {step} ({detail}); try a lower learning rate, check the data and cached "
            "teacher targets for NaN/Inf, or train in float32/bfloat16 rather than float16")


def check_finite(loss_parts: dict[str, torch.Tensor], step: int) -> None:
    """Raise `NonFiniteLossError` naming the step and the non-finite parts, before a bad step is applied."""
    bad = [name for name, value in loss_parts.items() if not torch.isfinite(torch.as_tensor(value)).all()]
    if bad:
        values = ", ".join(f"{name}={float(torch.as_tensor(loss_parts[name]).detach().float().mean()):g}" for name in bad)
        raise NonFiniteLossError(non_finite_message(step, values))
