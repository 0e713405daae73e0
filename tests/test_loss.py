"""The distillation objective: timestep sampling, weighting, feature KD, guards (flow algebra: test_flow)."""

import pytest
import torch

from wandistiller.flow import guided_velocity
from wandistiller.loss import (
    DistillLoss,
    FeatureAdapters,
    NonFiniteLossError,
    check_finite,
    feature_loss,
    sample_timesteps,
    timestep_weight,
    velocity_loss,
)


def _latents(seed: int, shape=(4, 16, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("distribution", ["shifted_uniform", "uniform", "logit_normal"])
def test_timesteps_stay_in_range(distribution):
    t = sample_timesteps(4096, distribution=distribution, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1000
    high_noise = sample_timesteps(
        4096, distribution=distribution, low=875, high=1000, generator=torch.Generator().manual_seed(0)
    )
    assert high_noise.min() >= 875 and high_noise.max() < 1000


def test_timesteps_are_reproducible_and_shift_skews_to_high_noise():
    def draw(**kwargs):
        return sample_timesteps(8192, generator=torch.Generator().manual_seed(0), **kwargs)

    torch.testing.assert_close(draw(), draw())
    uniform_mean = draw(distribution="uniform").mean()
    assert abs(uniform_mean - 500) < 15
    shifted = draw(shift=3.0)
    # Analytic mean of 1000 * 3u / (1 + 2u) for u ~ U(0, 1) is 1000 * (1.5 - 0.75 ln 3) ~= 676.
    assert abs(shifted.mean() - 676) < 15
    assert draw(shift=5.0).mean() > shifted.mean() > uniform_mean
    # The range restriction truncates the distribution instead of rescaling it: the shifted draw restricted
    # to [0, 500) has fewer samples near 0 than a rescaled shifted draw would.
    low_half = draw(shift=3.0, high=500)
    expected_fraction_below_250 = (0.25 / (3 - 2 * 0.25)) / (0.5 / (3 - 2 * 0.5))
    assert abs((low_half < 250).float().mean() - expected_fraction_below_250) < 0.03


def test_timestep_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="distribution"):
        sample_timesteps(2, distribution="cosine")
    with pytest.raises(ValueError, match="low"):
        sample_timesteps(2, low=500, high=500)


@pytest.mark.parametrize("weighting", ["none", "min_snr", "cosmap"])
def test_weights_have_mean_one_over_uniform_noise_levels(weighting):
    t = torch.linspace(0, 1000, 200_001)[:-1] + 0.0025  # midpoint rule over [0, 1000)
    weights = timestep_weight(t, weighting)
    assert (weights >= 0).all()
    assert abs(weights.mean().item() - 1.0) < 1e-3


def test_min_snr_weight_favours_mid_noise_over_the_ends():
    weights = timestep_weight(torch.tensor([10.0, 300.0, 990.0]), "min_snr")
    assert weights[1] > weights[0] and weights[1] > weights[2]


def test_velocity_loss_weighting_and_reduction():
    pred, target = _latents(0), _latents(1)
    t = torch.tensor([100.0, 400.0, 600.0, 900.0])
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(velocity_loss(pred, target), per_sample.mean())
    weighted = velocity_loss(pred, target, t, weighting="cosmap", reduction="none")
    torch.testing.assert_close(weighted, per_sample * timestep_weight(t, "cosmap"))
    with pytest.raises(ValueError, match="timesteps"):
        velocity_loss(pred, target, weighting="min_snr")
    with pytest.raises(ValueError, match="weighting"):
        velocity_loss(pred, target, t, weighting="snr")


def _features(seed: int, count: int, dim: int) -> list[torch.Tensor]:
    return [torch.randn(2, 6, dim, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]


def test_feature_loss_is_zero_for_identical_features_and_identity_adapters():
    feats = _features(0, 3, 8)
    adapters = FeatureAdapters(8, 8, num_pairs=2)
    block_map = [(0, 0), (2, 2)]
    assert feature_loss(feats, feats, adapters, block_map).item() == 0.0
    # The same identity reaches other teacher blocks: student block 1 vs teacher block 2 is not zero.
    assert feature_loss(feats, feats, adapters, [(0, 0), (1, 2)]).item() > 0


def test_narrow_adapter_embeds_student_channels_into_teacher_width():
    adapters = FeatureAdapters(4, 8, num_pairs=1)
    student = torch.randn(2, 6, 4)
    adapted = adapters(0, student)
    torch.testing.assert_close(adapted[..., :4], student)
    assert adapted[..., 4:].abs().max() == 0


def test_training_adapters_reduces_feature_loss():
    torch.manual_seed(0)
    student = _features(0, 2, 4)
    mix = torch.randn(4, 8)
    teacher = [s @ mix for s in student]  # teacher features are a linear map the adapters can learn
    adapters = FeatureAdapters(4, 8, num_pairs=2)
    block_map = [(0, 0), (1, 1)]
    optimizer = torch.optim.Adam(adapters.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = feature_loss(student, teacher, adapters, block_map)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_feature_loss_rejects_mismatched_shapes_and_pair_counts():
    adapters = FeatureAdapters(4, 8, num_pairs=1)
    with pytest.raises(ValueError, match="does not match"):
        feature_loss(_features(0, 1, 4), _features(1, 1, 6), adapters, [(0, 0)])
    with pytest.raises(ValueError, match="adapters"):
        feature_loss(_features(0, 2, 4), _features(1, 2, 8), adapters, [(0, 0), (1, 1)])


def test_distill_loss_combines_parts_and_gradients_reach_student_and_adapters():
    student_pred = _latents(0).requires_grad_()
    teacher_cond, teacher_uncond = _latents(1), _latents(2)
    student_feats = [f.requires_grad_() for f in _features(10, 2, 4)]
    teacher_feats = _features(20, 2, 8)
    adapters = FeatureAdapters(4, 8, num_pairs=2)
    distill = DistillLoss(feature_weight=0.5, cfg_distill=True, adapters=adapters, block_map=[(0, 0), (1, 1)])
    parts = distill(
        student_pred, teacher_cond, teacher_uncond, guidance=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        student_feats=student_feats, teacher_feats=teacher_feats,
    )
    assert set(parts) == {"loss", "velocity", "feature"}
    target = guided_velocity(teacher_cond, teacher_uncond, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(parts["velocity"], velocity_loss(student_pred, target))
    torch.testing.assert_close(parts["loss"], parts["velocity"] + 0.5 * parts["feature"])
    parts["loss"].backward()
    assert student_pred.grad is not None and student_pred.grad.abs().sum() > 0
    assert all(f.grad.abs().sum() > 0 for f in student_feats)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distill.parameters())
    assert len(list(distill.parameters())) == 4  # the adapters are the loss's own trainable parameters


def test_distill_loss_defaults_to_conditional_velocity_without_features():
    student_pred, teacher_cond = _latents(0), _latents(1)
    parts = DistillLoss()(student_pred, teacher_cond, teacher_uncond=_latents(2), guidance=5.0)
    torch.testing.assert_close(parts["loss"], velocity_loss(student_pred, teacher_cond))
    assert parts["feature"].item() == 0.0
    with pytest.raises(ValueError, match="teacher_uncond"):
        DistillLoss(cfg_distill=True)(student_pred, teacher_cond)
    with pytest.raises(ValueError, match="adapters"):
        DistillLoss(feature_weight=1.0)


def test_check_finite_names_step_and_part():
    check_finite({"loss": torch.tensor(1.0), "velocity": torch.tensor(1.0)}, step=3)
    with pytest.raises(NonFiniteLossError, match=r"step 17 .*feature=nan.*learning rate") as info:
        check_finite({"loss": torch.tensor(float("nan")), "feature": torch.tensor(float("nan"))}, step=17)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(NonFiniteLossError, match="velocity=inf"):
        check_finite({"velocity": torch.tensor(float("inf"))}, step=0)
