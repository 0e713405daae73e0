"""Where the toy-world teacher loses its shapes: the VAE's decoder, the low-noise expert, or the sampler.

Three tables, each the shape-correct rate (the toy-world scorer) per shape, on true renders with random sizes,
positions and colours:

1. decoder sensitivity: true latents (posterior mean) with Gaussian noise of `d` times each channel's std added,
   decoded. How precise must a generated latent be for its shape to survive decoding?
2. the low-noise expert's one-step estimate of the clean latent from true latents noised to sigma,
   x0 = x_t - sigma * v, at guidance 0 (unconditional), 1 (conditional) and 5; with the estimate's relative
   error (RMS of x0 - z0 over RMS of z0, normalised latents). How precise are the expert's latents?
3. the teacher from pure noise (WanPipeline, 30 steps, guidance 5) on the training combinations of each shape.

`--vae FOLDER` probes another VAE (an `AutoencoderKLWan` folder, e.g. one trained with another recipe) in
table 1 only: the experts belong to the teacher's own VAE.

Run: `python benchmarks/toy_world_shapes.py [--teacher data/toy_world] [--count 48] [--vae FOLDER]`
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wandistiller import shapes  # noqa: E402
from wandistiller.alignment import alignment  # noqa: E402
from wandistiller.analysis import Table  # noqa: E402
from wandistiller.toy_world import TOY_WORLD_PATH  # noqa: E402

DECODER_NOISE = (0.0, 0.05, 0.1, 0.2)
SIGMAS = (0.1, 0.2, 0.4, 0.7)
GUIDANCE = (0.0, 1.0, 5.0)


def renders(count: int, shape: str, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """`count` random training scenes of one shape as single frames: (N, 3, 1, 64, 64) and their captions."""
    combinations = [combo for combo in shapes.training_combinations() if combo[0] == shape]
    return shapes.sample_batch(random.Random(f"shapes-probe-{seed}-{shape}"), count, 1, combinations)


def shape_rate(vae, latents: torch.Tensor, captions: list[str], mean, std) -> float:
    decoded = vae.decode(latents * std + mean).sample
    return alignment(list(decoded[:, :, 0]), captions).shape


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=str(TOY_WORLD_PATH), help="a toy-world Wan pipeline folder")
    parser.add_argument("--count", type=int, default=48, help="renders per shape")
    parser.add_argument("--vae", default=None, help="probe this AutoencoderKLWan folder in table 1 instead")
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    pipe = WanPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    vae = AutoencoderKLWan.from_pretrained(args.vae).eval() if args.vae else pipe.vae
    data = {shape: renders(args.count, shape) for shape in shapes.SHAPES}
    latents = {shape: vae.encode(x).latent_dist.mean for shape, (x, _) in data.items()}
    every = torch.cat(list(latents.values()))  # each channel's statistics over these renders
    mean = every.mean((0, 2, 3, 4), keepdim=True)
    std = every.std((0, 2, 3, 4), keepdim=True)
    generator = torch.Generator().manual_seed(0)

    print(f"1. decoder: shape-correct after adding noise to true latents ({args.count} renders per shape"
          f"{', VAE ' + args.vae if args.vae else ''})\n")
    rows = []
    for d in DECODER_NOISE:
        row = [f"{d:g} std"]
        for shape in shapes.SHAPES:
            z0 = (latents[shape] - mean) / std
            row.append(shape_rate(vae, z0 + d * torch.randn(z0.shape, generator=generator), data[shape][1], mean, std))
        rows.append(row)
    print(Table(("latent noise", *shapes.SHAPES), rows))
    if args.vae:
        return 0

    # The pipeline's own normalisation from here on: what the experts were trained on.
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    expert = pipe.transformer_2
    print("\n2. low-noise expert: one-step estimate of the clean latent from true latents noised to sigma;"
          " shape-correct (relative latent error)\n")
    rows = []
    for sigma in SIGMAS:
        for shape in shapes.SHAPES:
            captions = data[shape][1]
            z0 = (latents[shape] - mean) / std
            x_t = (1 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=generator)
            cond, uncond = pipe.encode_prompt(captions, [""] * len(captions), do_classifier_free_guidance=True)
            t = torch.full((len(captions),), sigma * 1000.0)
            v_cond = expert(x_t, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            v_uncond = expert(x_t, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
            row = [f"{sigma:g}", shape]
            for scale in GUIDANCE:
                x0 = x_t - sigma * (v_uncond + scale * (v_cond - v_uncond))
                error = ((x0 - z0).pow(2).mean() / z0.pow(2).mean()).sqrt().item()
                row.append(f"{shape_rate(pipe.vae, x0, captions, mean, std):.2f} ({error:.3f})")
            rows.append(row)
    print(Table(("sigma", "shape", *[f"guidance {g:g}" for g in GUIDANCE]), rows))

    print("\n3. teacher from noise (30 steps, guidance 5) on every training combination, by shape\n")
    rows = []
    for shape in shapes.SHAPES:
        prompts = [shapes.Scene(*combo).caption for combo in shapes.training_combinations() if combo[0] == shape]
        frames = pipe(prompt=prompts, height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, num_frames=1,
                      num_inference_steps=30, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                      output_type="pt").frames
        result = alignment([f[0] * 2 - 1 for f in frames], prompts)
        rows.append([shape, len(prompts), result.shape, result.all_correct])
    print(Table(("shape", "prompts", "shape-correct", "all-correct"), rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
