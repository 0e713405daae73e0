"""The 2D Wan VAE is the 3D one at T=1: same encode and decode, no Conv3d, only dead temporal taps dropped."""

import pytest
import torch
from torch import nn

from wandistiller.evaluate import compare_vaes
from wandistiller.toy import build_tiny_wan
from wandistiller.vae2d import WanVAE2D, vae_to_2d

HEIGHT, WIDTH = 48, 80  # non-square, so a swapped height/width axis cannot pass
# Reduction order only: a Conv2d sums its products in another order than the Conv3d it came from.
TOLERANCE = 1e-5


def _randomised(vae, seed: int = 0):
    """Every parameter random, norm gains included (a gain left at 1 would hide a norm reshaped wrongly).

    Scale 0.2 keeps decoded pixels inside Wan's [-1, 1] clamp, which would otherwise hide differences.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return vae.eval()


@pytest.fixture(scope="module", params=["a14b", "ti2v-5b"], ids=["wan2.1-vae", "wan2.2-vae"])
def vaes(request):
    vae = _randomised(build_tiny_wan(request.param).vae)
    return vae, vae_to_2d(vae)


def _images(seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(vae, seed: int = 2) -> torch.Tensor:
    s = vae.config.scale_factor_spatial
    return torch.randn(2, vae.config.z_dim, HEIGHT // s, WIDTH // s, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_encode_equals_the_3d_vae_on_one_frame(vaes):
    vae, vae2d = vaes
    x = _images()
    expected = vae.encode(x.unsqueeze(2)).latent_dist
    got = vae2d.encode(x).latent_dist
    assert got.mean.shape == expected.mean[:, :, 0].shape
    torch.testing.assert_close(got.mean, expected.mean[:, :, 0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got.logvar, expected.logvar[:, :, 0], atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_decode_equals_the_3d_vae_on_one_frame(vaes):
    vae, vae2d = vaes
    z = _latents(vae)
    expected = vae.decode(z.unsqueeze(2)).sample[:, :, 0]
    assert (expected.abs() < 1).float().mean() > 0.9  # mostly unclamped, so the comparison sees the network
    got = vae2d.decode(z).sample
    assert got.shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_no_conv3d_and_only_dead_temporal_taps_dropped(vaes):
    vae, vae2d = vaes
    assert any(isinstance(m, nn.Conv3d) for m in vae.modules())
    assert [name for name, m in vae2d.named_modules() if isinstance(m, nn.Conv3d)] == []
    # What a single frame uses of the 3D VAE: one tap of each causal kernel; no temporal up/down-sampling conv.
    live = sum(p.numel() // (p.shape[2] if p.dim() == 5 else 1)
               for name, p in vae.named_parameters() if ".time_conv." not in name)
    assert sum(p.numel() for p in vae2d.parameters()) == live


@torch.no_grad()
def test_save_and_load_round_trip_is_exact(vaes, tmp_path):
    vae, vae2d = vaes
    vae2d.save_pretrained(tmp_path)
    loaded = WanVAE2D.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # not _name_or_path
    assert public(loaded.config) == public(vae2d.config) == public(vae.config)
    x, z = _images(), _latents(vae)
    torch.testing.assert_close(loaded.decode(z).sample, vae2d.decode(z).sample, atol=0, rtol=0)
    expected, got = vae2d.encode(x).latent_dist, loaded.encode(x).latent_dist
    torch.testing.assert_close(got.mean, expected.mean, atol=0, rtol=0)
    torch.testing.assert_close(got.logvar, expected.logvar, atol=0, rtol=0)


def test_compare_vaes_counts_and_times_both(vaes):
    vae, vae2d = vaes
    three_d, two_d, gain = compare_vaes(vae, vae2d, height=HEIGHT, width=WIDTH, repeats=1).to_records()
    for column in ("params", "encode FLOPs", "decode FLOPs"):
        assert 0 < two_d[column] < three_d[column]
    assert three_d["decodes/s"] > 0 and two_d["decodes/s"] > 0
    assert gain["decode FLOPs"] == f"{three_d['decode FLOPs'] / two_d['decode FLOPs']:.2f}x"
