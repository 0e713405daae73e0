"""Evaluate a student against its teacher: images from the same noise, size, cost per image and speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .flow import MAX_SEQUENCE_LENGTH, guided_velocity
from .viz import Table


def find_student(output_dir: str | Path, student_path: str | Path | None = None) -> Path:
    """`student_path`, or the student notebook 03 wrote under `output_dir/distill` (EMA weights first)."""
    candidates = [Path(student_path)] if student_path else [Path(output_dir) / "distill" / name
                                                            for name in ("student_ema", "student")]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(f"no trained student at {' or '.join(map(str, candidates))}: run 03_distill.ipynb "
                            "first (same output_dir) or pass student_path")


def find_pipeline(path: str | Path) -> Path:
    """The Wan-Lite pipeline folder at `path`: the folder itself, or the `pipeline/` a distillation run wrote in
    `path` (a run's output_dir) or in `path/distill` (the notebooks' output_dir)."""
    from .pipeline import PIPELINE_DIR

    path = Path(path)
    candidates = [path, path / PIPELINE_DIR, path / "distill" / PIPELINE_DIR]
    found = next((c for c in candidates if (c / "model_index.json").is_file()), None)
    if found is None and path.is_dir():
        raise FileNotFoundError(f"no Wan-Lite pipeline in {path} (no model_index.json there nor in {PIPELINE_DIR}/): "
                                "pass the pipeline folder a distillation run writes (output_dir/pipeline)")
    return found or path


def load_student_pipeline(path: str | Path, device: str | torch.device | None = None, **kwargs):
    """A saved `WanLitePipeline` (see `find_pipeline` for where it is looked for), loaded offline, on `device`."""
    from .pipeline import WanLitePipeline

    pipe = WanLitePipeline.from_pretrained(find_pipeline(path), **kwargs)
    return pipe if device is None else pipe.to(device)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, latent_hw: tuple[int, int], device: str | torch.device = "cpu",
                  text: torch.Tensor | None = None) -> int:
    """FLOPs of one forward on one image (batch 1); a 3D Wan teacher gets a single frame.

    The text is `text` (1, L, text_dim), e.g. a real prompt's embeddings as WanPipeline zero-pads them, or by
    default MAX_SEQUENCE_LENGTH random rows (no padding): a Wan-Lite student skips the padding of a real prompt
    (`text_padding`), a Wan teacher computes every row.
    """
    config = model.config
    h, w = latent_hw
    frame = (1,) if len(config.patch_size) == 3 else ()
    with torch.device(device):  # on meta, Wan's RoPE tables must be made on meta too
        latents = torch.randn(1, config.in_channels, *frame, h, w)
        text = torch.randn(1, MAX_SEQUENCE_LENGTH, config.text_dim) if text is None else text.to(device)
        timestep = torch.full((1,), 500.0)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(latents, timestep, text, return_dict=False)
    return counter.get_total_flops()


def images_per_second(sample, batch_size: int, repeats: int = 3) -> float:
    """Median throughput of `sample()` (one warm-up call first)."""
    sample()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample()
        seconds.append(time.perf_counter() - start)
    return batch_size / statistics.median(seconds)


def initial_noise(teacher, batch_size: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The teacher's initial latent noise for `seed` (B, C, 1, H/s, W/s): what every comparison here samples from."""
    return torch.randn(teacher.latent_shape(batch_size, height, width), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def teacher_and_student_images(teacher, student_pipe, prompts: list[str], *, height: int, width: int,
                               num_inference_steps: int, seed: int = 0) -> dict:
    """{"teacher": [...], "student": [...]} PIL images for `prompts`, both from the same initial noise.

    The teacher samples with its pipeline's scheduler and guidance one expert at a time (all high-noise steps,
    then all low-noise steps: `data.record_trajectories`), so one A14B expert is resident, not two; its latents
    are WanPipeline's up to float rounding. Both are decoded by the student pipeline's VAE (the teacher's, or
    its exact 2D form).
    """
    noise, embeds, negative, final = _teacher_samples(teacher, prompts, height, width, num_inference_steps, seed)
    student_images = student_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise[:, :, 0],
                                  num_inference_steps=num_inference_steps, output_type="pil").images
    return {"teacher": student_pipe.decode_latents(final[:, :, 0]), "student": student_images}


def _teacher_samples(teacher, prompts: list[str], height: int, width: int, num_inference_steps: int, seed: int):
    """(noise, prompt embeddings, negative embeddings, the teacher's final latents from that noise), sampled
    expert by expert (`data.record_trajectories`)."""
    from .data import TargetSpec, record_trajectories

    noise = initial_noise(teacher, len(prompts), height, width, seed)
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    _, final = record_trajectories(teacher, embeds, negative, noise,
                                   TargetSpec(num_inference_steps=num_inference_steps), progress=False)
    return noise, embeds, negative, final


@torch.no_grad()
def step_count_images(teacher, student_pipe, prompts: list[str], *, step_counts=(1, 2, 4, 8), teacher_steps: int,
                      height: int, width: int, seed: int = 0) -> dict:
    """The teacher at `teacher_steps` and the student at each of `step_counts`, all from the same noise:
    {"teacher, N steps": [...], "student, n steps": [...], ...} PIL images for `prompts`. The student samples
    with its pipeline's defaults (a few-step pipeline: evenly spaced Euler steps, no guidance when distilled)."""
    noise, embeds, negative, final = _teacher_samples(teacher, prompts, height, width, teacher_steps, seed)
    rows = {f"teacher, {teacher_steps} steps": student_pipe.decode_latents(final[:, :, 0])}
    for steps in step_counts:
        rows[f"student, {steps} step{'s' if steps > 1 else ''}"] = student_pipe(
            prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise[:, :, 0],
            num_inference_steps=steps, output_type="pil").images
    return rows


@torch.no_grad()
def expert_images(teacher, prompts: list[str], *, height: int, width: int, num_inference_steps: int,
                  seed: int = 0) -> dict:
    """What each expert draws, from the same noise: PIL images for `prompts` in rows "high-noise expert alone",
    "low-noise expert alone" and "both experts". Alone, an expert runs every step of the teacher's sampler (its
    scheduler and guidance); "both experts" is the teacher's own sampling, one expert above the boundary and
    the other below it. A single-expert teacher gives one row, "the teacher"."""
    from diffusers.image_processor import VaeImageProcessor

    from .pipeline import decode_wan_latents

    noise, embeds, negative, both = _teacher_samples(teacher, prompts, height, width, num_inference_steps, seed)
    latents = {}
    if len(teacher.expert_names) > 1:
        for role in ("high_noise", "low_noise"):
            name = teacher.expert_for_role(role)
            with teacher.only_expert(name):
                latents[f"{role.replace('_', '-')} expert alone"] = _one_expert_sampler(
                    teacher, name, embeds, negative, noise, num_inference_steps)()
    latents["both experts" if latents else "the teacher"] = both
    processor = VaeImageProcessor(vae_scale_factor=teacher.vae_scale_factor)
    return {label: decode_wan_latents(teacher.pipe.vae, z[:, :, 0], processor) for label, z in latents.items()}


def _one_expert_sampler(teacher, name: str, embeds, negative, noise, num_inference_steps: int):
    """`sample()`: the teacher's sampler (its scheduler and guidance) with expert `name` at every step, from
    prompt embeddings to latents. It costs what WanPipeline's image costs (A14B's two experts have the same
    size) with one expert resident."""
    import copy

    scheduler = copy.deepcopy(teacher.pipe.scheduler)
    negative = negative if teacher.uses_cfg else None

    def sample():
        scheduler.set_timesteps(num_inference_steps)
        scheduler.set_begin_index(0)
        latents = noise
        for t in scheduler.timesteps:
            out = teacher.expert_velocities(name, latents, t, embeds, negative)
            velocity = guided_velocity(out.v_cond, out.v_uncond, teacher.guidance_for_expert(name))
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents

    return sample


def compare_speed_and_size(teacher, student_pipe, *, height: int, width: int, num_inference_steps: int,
                           repeats: int = 3) -> Table:
    """Parameters, forward FLOPs, forwards and FLOPs per image, and measured images/s (teacher vs student).

    The teacher is timed with one expert resident, running every step (A14B's two experts cost the same per
    step), and counted by that expert's parameters (one is active per step); its images use its guidance (two
    forwards per step with CFG), the student's its pipeline's default (one forward per step when
    CFG-distilled). Both generate from prompt embeddings to latents, so the shared text encoder and VAE do not
    blur the comparison.
    """
    noise = initial_noise(teacher, 1, height, width, seed=0)
    latent_hw = tuple(noise.shape[-2:])
    embeds, negative = teacher.encode_prompts(["a red fox sitting in fresh snow"], negative="")
    student = student_pipe.transformer
    student_pipe.set_progress_bar_config(disable=True)

    def student_sample():
        student_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise[:, :, 0],
                     num_inference_steps=num_inference_steps, output_type="latent")

    rows = []
    teacher_forwards = num_inference_steps * (2 if teacher.uses_cfg else 1)
    student_forwards = num_inference_steps * (2 if student_pipe.default_guidance_scale() > 1 else 1)
    name = teacher.expert_names[0]
    with teacher.only_expert(name) as expert:
        teacher_sample = _one_expert_sampler(teacher, name, embeds, negative, noise, num_inference_steps)
        for label, model, forwards, sample in (("teacher", expert, teacher_forwards, teacher_sample),
                                               ("student", student, student_forwards, student_sample)):
            flops = forward_flops(model, latent_hw, device=next(model.parameters()).device)
            rows.append((label, num_params(model), flops, forwards, flops * forwards,
                         images_per_second(sample, 1, repeats)))
    (_, tp, tf, _, ti, ts), (_, sp, sf, _, si, ss) = rows
    rows.append(("student gain", f"{tp / sp:.1f}x", f"{tf / sf:.1f}x", "", f"{ti / si:.1f}x", f"{ss / ts:.2f}x"))
    return Table(("model", "params", "forward FLOPs", "forwards/image", "FLOPs/image", "images/s"), rows,
                 f"{height}x{width}, {num_inference_steps} steps; teacher = one expert, with its guidance; "
                 "student gain = teacher/student for size and FLOPs, student/teacher for images/s")


def vae_flops(vae, height: int, width: int) -> tuple[int, int]:
    """(encode, decode) FLOPs for one height x width image, counted on the VAE's device (meta: full size, free).

    A 3D `AutoencoderKLWan` gets it as a single frame; a `WanVAE2D` as an image.
    """
    from diffusers import AutoencoderKLWan

    frame = (1,) if isinstance(vae, AutoencoderKLWan) else ()
    s = vae.config.scale_factor_spatial
    image = torch.zeros(1, 3, *frame, height, width, device=vae.device, dtype=vae.dtype)
    latents = torch.zeros(1, vae.config.z_dim, *frame, height // s, width // s, device=vae.device, dtype=vae.dtype)
    flops = []
    for run in (lambda: vae.encode(image), lambda: vae.decode(latents)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        flops.append(counter.get_total_flops())
    return tuple(flops)


def compare_vaes(vae, vae2d=None, *, height: int, width: int, repeats: int = 3) -> Table:
    """Wan's 3D VAE vs its exact 2D form (`vae_to_2d`) on one image: parameters, FLOPs, measured decodes/s.

    Decodes are timed on the VAEs' device from the same latents (not on meta, where only counting works).
    """
    from .vae2d import vae_to_2d

    vae2d = vae_to_2d(vae) if vae2d is None else vae2d
    s = vae.config.scale_factor_spatial
    z = torch.randn(1, vae.config.z_dim, height // s, width // s, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, model, latents in (("3D AutoencoderKLWan, T=1", vae, z.unsqueeze(2)), ("2D WanVAE2D", vae2d, z)):
        latents = latents.to(model.device, model.dtype)
        # .item() waits for the decode on an asynchronous device (CUDA) so the time is the decode's.
        speed = None if model.device.type == "meta" else images_per_second(
            torch.no_grad()(lambda: model.decode(latents).sample.sum().item()), 1, repeats)
        rows.append((name, num_params(model), *vae_flops(model, height, width), speed))
    (_, p3, e3, d3, t3), (_, p2, e2, d2, t2) = rows
    rows.append(("2D gain", f"{p3 / p2:.2f}x", f"{e3 / e2:.2f}x", f"{d3 / d2:.2f}x",
                 f"{t2 / t3:.2f}x" if t3 else None))
    return Table(("VAE", "params", "encode FLOPs", "decode FLOPs", "decodes/s"), rows,
                 f"{height}x{width}, one image; gain = 3D/2D for size and FLOPs, 2D/3D for decodes/s")


def alignment_table(images: dict[str, list], prompts: list[str], title: str = "") -> Table:
    """Toy-world prompt alignment per model: background, shape colour, shape and all-correct rates.

    `images` maps a model name to its images for `prompts` (e.g. `teacher_and_student_images`' output).
    """
    from .alignment import alignment

    rows = [(name, *alignment(pictures, prompts).as_row().values()) for name, pictures in images.items()]
    return Table(("model", "background", "colour", "shape", "all-correct"), rows,
                 title or f"toy-world alignment on {len(prompts)} prompts (fractions correct)")
