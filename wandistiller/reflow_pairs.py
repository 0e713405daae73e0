"""Reflow's pairs sampled by the student it starts from.

Reflow learns straight paths from a noise z to a final latent x0. The recorded teacher trajectories give such
pairs, but only `trajectories_per_prompt` of them per prompt (the demo: 6), and a student regressed on so few
noises per prompt averages between them at new noise: at 1–4 steps its shapes break up. A velocity-distilled
student samples much more cheaply than the teacher (one smaller forward per step, no CFG), so it can draw many
pairs per prompt from its own sampler; reflow on those is the classic 2-rectified flow of that student's ODE.
`StudentPairs` holds them, `sample_student_pairs` draws them and `student_pairs` finds them on disk or draws them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import save_atomically, wait_for_files

PAIRS_FILE = "reflow_pairs.safetensors"


@dataclass
class StudentPairs:
    """`noise` and `final`, both (per_prompt, num_prompts, C, h, w): pair k of prompt p is (noise[k, p], final[k, p])."""

    noise: torch.Tensor
    final: torch.Tensor

    @property
    def per_prompt(self) -> int:
        return self.noise.shape[0]

    def pairs(self, prompt_index: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, final) of pair `choice[i]` of prompt `prompt_index[i]`, for each i."""
        return self.noise[choice, prompt_index], self.final[choice, prompt_index]


def pair_noise(seed: int, per_prompt: int, num_prompts: int, latent_shape: tuple) -> torch.Tensor:
    """The starting noise (per_prompt, num_prompts, *latent_shape), float32, a function of `seed` alone."""
    key = hashlib.sha256(f"reflow-pairs:{seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randn(per_prompt, num_prompts, *latent_shape, generator=generator)


@torch.no_grad()
def sample_student_pairs(pipe, embeds: torch.Tensor, noise: torch.Tensor, steps: int, batch_size: int = 64,
                         progress: bool = True) -> StudentPairs:
    """The final latents `pipe` (a `WanLitePipeline` of a CFG-distilled student) samples from each noise in
    `noise` (per_prompt, num_prompts, C, h, w) for the prompts `embeds` (num_prompts, L, D), at `steps` sampler
    steps with one forward per step."""
    device = next(pipe.transformer.parameters()).device
    per_prompt, num_prompts = noise.shape[:2]
    # every (pair, prompt) in one flat list cut into full batches: per prompt-batch, a remainder of a few prompts
    # would cost a whole sampler run each
    flat_noise = noise.reshape(per_prompt * num_prompts, *noise.shape[2:])
    prompt_of = torch.arange(num_prompts).repeat(per_prompt)
    final = torch.empty_like(flat_noise)
    starts = range(0, len(flat_noise), batch_size)
    for i in tqdm(starts, desc="reflow pairs from the student", unit="batch", disable=not progress):
        rows = slice(i, i + batch_size)
        final[rows] = pipe(prompt_embeds=embeds[prompt_of[rows]].to(device), latents=flat_noise[rows].to(device),
                           num_inference_steps=steps, guidance_scale=1.0, output_type="latent").images.float().cpu()
    return StudentPairs(noise, final.view_as(noise))


def student_pairs(out: Path, settings: dict, make_pipe, embeds_of, num_prompts: int, latent_shape: tuple,
                  is_main: bool, progress: bool) -> StudentPairs:
    """The run's student-sampled pairs, `out / PAIRS_FILE`: drawn by rank 0 when the file is missing
    (`make_pipe()` builds the sampler, `embeds_of(prompt_indices)` gives the prompts' embeddings) and written
    atomically, while the other ranks wait for it on disk (not in a collective, which could time out while rank 0
    samples); read again by a resumed run, and refused if drawn with other `settings`."""
    from safetensors import safe_open

    path = out / PAIRS_FILE
    record = json.dumps(settings, sort_keys=True)
    if is_main and not path.is_file():
        noise = pair_noise(settings["seed"], settings["per_prompt"], num_prompts, latent_shape)
        pairs = sample_student_pairs(make_pipe(), embeds_of(torch.arange(num_prompts)), noise, settings["steps"],
                                     progress=progress)
        save_atomically({"noise": pairs.noise, "final": pairs.final}, path, metadata={"settings": record})
    wait_for_files([path])
    if _settings(path) != record:
        raise ValueError(f"{path} holds reflow pairs drawn with other settings than this run's: resume with the "
                         "run's own settings, or pass overwrite=True to start it afresh")
    with safe_open(path, framework="pt") as f:
        return StudentPairs(f.get_tensor("noise"), f.get_tensor("final"))


def _settings(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("settings")
