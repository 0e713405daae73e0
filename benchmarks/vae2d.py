"""Wan's causal 3D VAE vs its exact 2D form (`wandistiller.vae2d`): FLOPs, parameters and CPU decode time.

Two parts:

1. Counted on the meta device (no memory, no time): the real Wan 2.1 VAE (A14B and Wan 2.1 pipelines;
   diffusers' `AutoencoderKLWan()` defaults) and the Wan 2.2 VAE of TI2V-5B, encoding and decoding one image
   at 512² and 1024², 3D (one frame) vs 2D.
2. Measured on this machine in one run: decoding one image with random weights, 3D vs 2D, alternating the
   two so a change in load hits both, median of --repeats. VAEs: the embedded tiny teachers' and the real
   layouts at 1/--width-divisor of their width (the full ones take minutes per decode on a small CPU). Wall
   time and process CPU time are both shown: on a shared machine the CPU time is the steadier ratio.

Run: `python benchmarks/vae2d.py [--time-size 512] [--repeats 3] [--width-divisor 4]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKLWan

from wandistiller.analysis import Table
from wandistiller.evaluate import num_params, vae_flops
from wandistiller.toy import build_tiny_wan
from wandistiller.vae2d import vae_to_2d

WAN21_VAE = {}  # AutoencoderKLWan's defaults are the Wan 2.1 VAE
# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (statistics left neutral: they do not change the cost).
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, patch_size=2,
                 is_residual=True, scale_factor_temporal=4, scale_factor_spatial=16,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
REAL_VAES = {"Wan 2.1 VAE (A14B)": WAN21_VAE, "Wan 2.2 VAE (TI2V-5B)": WAN22_VAE}


def flops_table(sizes: list[int]) -> Table:
    rows = []
    for name, config in REAL_VAES.items():
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
            vae2d = vae_to_2d(vae)
        for size in sizes:
            (e3, d3), (e2, d2) = vae_flops(vae, size, size), vae_flops(vae2d, size, size)
            rows.append((name, f"{size}²", num_params(vae), num_params(vae2d), f"{d3 / 1e12:.2f}",
                         f"{d2 / 1e12:.2f}", f"{d3 / d2:.2f}x", f"{e3 / e2:.2f}x"))
    return Table(("VAE", "image", "params 3D", "params 2D", "decode TFLOP 3D", "decode TFLOP 2D", "decode 3D/2D",
                  "encode 3D/2D"), rows, "Counted on the meta device, one image, batch 1")


def _seconds(decode) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    decode()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def time_table(size: int, repeats: int, width_divisor: int) -> Table:
    vaes = {f"tiny teacher VAE ({variant})": build_tiny_wan(variant).vae for variant in ("a14b", "ti2v-5b")}
    for name, config in REAL_VAES.items():
        base = config.get("base_dim", 96)
        narrow = dict(base_dim=base // width_divisor,
                      decoder_base_dim=config.get("decoder_base_dim", base) // width_divisor)
        vaes[f"{name} at 1/{width_divisor} width"] = AutoencoderKLWan(**{**config, **narrow})
    rows = []
    for name, vae in vaes.items():
        vae.eval()
        vae2d = vae_to_2d(vae)
        s = vae.config.scale_factor_spatial
        z = torch.randn(1, vae.config.z_dim, size // s, size // s, generator=torch.Generator().manual_seed(0))
        decodes = {"3D": lambda: vae.decode(z.unsqueeze(2)), "2D": lambda: vae2d.decode(z)}
        for decode in decodes.values():
            decode()  # warm-up
        times = {key: [] for key in decodes}
        for _ in range(repeats):
            for key, decode in decodes.items():
                times[key].append(_seconds(decode))
        median = lambda key, i: statistics.median(t[i] for t in times[key])  # i: 0 wall, 1 CPU
        w3, c3, w2, c2 = median("3D", 0), median("3D", 1), median("2D", 0), median("2D", 1)
        rows.append((name, num_params(vae), num_params(vae2d), w3, w2, f"{w3 / w2:.2f}x", c3, c2, f"{c3 / c2:.2f}x"))
    return Table(("VAE", "params 3D", "params 2D", "wall s 3D", "wall s 2D", "wall 3D/2D", "CPU s 3D", "CPU s 2D",
                  "CPU 3D/2D"),
                 rows, f"Decode of one {size}² image on this CPU ({torch.get_num_threads()} threads), median of "
                       f"{repeats}, random weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--time-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width-divisor", type=int, default=4)
    args = parser.parse_args()
    print(flops_table(args.flops_sizes), end="\n\n")
    print(time_table(args.time_size, args.repeats, args.width_divisor))


if __name__ == "__main__":
    main()
