"""Wan's flow-matching conventions (wandistiller.flow), checked against diffusers' own scheduler and pipeline rule."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from wandistiller.flow import (
    DEFAULT_FLOW_SHIFT, NUM_TRAIN_TIMESTEPS, add_noise, expert_timestep_range, guided_velocity, per_token_timesteps,
    scheduler_shift, shift_sigma, sigma_from_timestep, timestep_from_sigma, unshift_sigma,
)


def _latents(seed: int, shape=(4, 16, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _wan_scheduler(steps: int, shift: float = 3.0) -> UniPCMultistepScheduler:
    """The scheduler a Wan 2.2 Diffusers checkpoint ships (and the tiny teacher uses)."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=NUM_TRAIN_TIMESTEPS, flow_shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def test_guided_velocity_endpoints_and_per_sample_scales():
    v_cond, v_uncond = _latents(0), _latents(1)
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, 1.0), v_cond)
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, 0.0), v_uncond)
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, 4.0), v_uncond + 4.0 * (v_cond - v_uncond))
    # Per-sample scales, as when one batch spans both A14B experts (guidance_scale vs guidance_scale_2).
    scales = torch.tensor([1.0, 0.0, 3.0, 4.0])
    guided = guided_velocity(v_cond, v_uncond, scales)
    torch.testing.assert_close(guided[0], v_cond[0])
    torch.testing.assert_close(guided[1], v_uncond[1])
    torch.testing.assert_close(guided[3], guided_velocity(v_cond, v_uncond, 4.0)[3])


def test_add_noise_and_velocity_invert_like_a_flow_matching_sampler():
    x0, noise = _latents(0), _latents(1)
    t = torch.tensor([0.0, 250.0, 875.0, 999.0])
    x_t = add_noise(x0, noise, t)
    v = noise - x0  # the velocity a Wan transformer predicts (flow's convention)
    sigma = sigma_from_timestep(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - sigma * v, x0)
    torch.testing.assert_close(x_t + (1 - sigma) * v, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    # One Euler step with the exact velocity lands on the noisy latent of the next noise level.
    t_next = t * 0.5
    sigma_next = sigma_from_timestep(t_next).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t + (sigma_next - sigma) * v, add_noise(x0, noise, t_next))
    # Any latent rank: Wan's single-frame (B, C, 1, H, W) latents noise the same way.
    torch.testing.assert_close(add_noise(x0[:, :, None], noise[:, :, None], t)[:, :, 0], x_t, rtol=0, atol=0)


@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_sigmas_and_shift_are_the_schedulers(shift):
    scheduler = _wan_scheduler(12, shift)
    sigmas = scheduler.sigmas[:-1].double()  # the last sigma (0) closes the schedule; no step runs at it
    # UniPC's flow sigmas are evenly spaced noise levels from 1 down, through the shift (the first nudged by 1e-6)
    unshifted = torch.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, 13, dtype=torch.float64)[:-1]
    torch.testing.assert_close(sigmas, shift_sigma(unshifted, shift), rtol=0, atol=2e-6)  # float32 + nudge
    torch.testing.assert_close(unshift_sigma(shift_sigma(unshifted, shift), shift), unshifted)
    # and its timesteps are those noise levels in timestep units (truncated to integers)
    assert scheduler.timesteps.tolist() == timestep_from_sigma(sigmas).to(torch.int64).tolist()
    assert torch.equal(sigma_from_timestep(timestep_from_sigma(sigmas)), sigmas)


@pytest.mark.parametrize("steps", [4, 8, 40, 1000])
def test_expert_ranges_hold_every_timestep_the_pipeline_visits(steps):
    boundary = 0.875 * NUM_TRAIN_TIMESTEPS  # Wan 2.2 A14B
    for t in _wan_scheduler(steps).timesteps.tolist():
        role = "high_noise" if t >= boundary else "low_noise"  # WanPipeline's rule
        low, high = expert_timestep_range(role, boundary)
        assert low <= t < high, f"timestep {t} of a {steps}-step schedule falls outside the {role} range"


def test_expert_ranges_split_the_timesteps_at_the_boundary():
    assert expert_timestep_range("high_noise", 875.0) == (875.0, NUM_TRAIN_TIMESTEPS)
    assert expert_timestep_range("low_noise", 875.0) == (0.0, 875.0)
    for role in ("high_noise", "low_noise", "mean"):  # one expert (TI2V-5B, Wan 2.1): every timestep
        assert expert_timestep_range(role, None) == (0.0, NUM_TRAIN_TIMESTEPS)
    assert expert_timestep_range("mean", 875.0) == (0.0, NUM_TRAIN_TIMESTEPS)
    with pytest.raises(ValueError, match="unknown expert role"):
        expert_timestep_range("medium_noise", 875.0)


def test_expert_ranges_are_where_the_teacher_routes(tiny_teacher):
    boundary = tiny_teacher.boundary_timestep
    for role in ("high_noise", "low_noise"):
        low, high = expert_timestep_range(role, boundary)
        below_high = torch.nextafter(torch.tensor(high), torch.tensor(low)).item()
        assert {tiny_teacher.expert_for_timestep(t) for t in (low, below_high)} == {tiny_teacher.expert_for_role(role)}


def test_per_token_timesteps_repeat_each_timestep_per_patch():
    t = torch.tensor([100.0, 900.0])
    wan = per_token_timesteps(t, (1, 8, 6), (1, 2, 2))  # (frames, height, width) of a Wan expert
    assert wan.shape == (2, 12) and (wan[0] == 100).all() and (wan[1] == 900).all()
    assert torch.equal(per_token_timesteps(t, (8, 6), (2, 2)), wan)  # the 2D student: same tokens
    with pytest.raises(ValueError, match="name different axes"):
        per_token_timesteps(t, (8, 6), (1, 2, 2))


def test_scheduler_shift_defaults_to_wans():
    assert scheduler_shift({"flow_shift": 5.0}) == 5.0
    assert scheduler_shift({}) == scheduler_shift({"flow_shift": None}) == DEFAULT_FLOW_SHIFT == 3.0
