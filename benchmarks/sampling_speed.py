"""Student vs teacher sampling speed, parameters and per-forward FLOPs, printed as ratio tables.

Two parts:

1. Measured on this machine: the embedded tiny Wan 2.2 teacher (WanPipeline, CFG, two experts) against tiny
   students (WanLitePipeline, one forward per step) at the same resolution and number of steps. Timed twice:
   end to end (text encoding + denoising + VAE decoding, as a user sees it) and denoising only (prompt
   embeddings given, latents out), because at toy sizes the text encoder and VAE dominate.
2. Counted on the meta device (no memory, no time): parameters and FLOPs of one forward of the real A14B /
   TI2V-5B experts against the student of config/student_config.json, and the per-image cost at the
   same steps with the teacher's CFG (two forwards per step) against the student's one.

Run: `python benchmarks/sampling_speed.py [--size 64] [--steps 8] [--repeats 3]`. The machines are shared and
noisy: compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from wandistiller.evaluate import forward_flops, images_per_second, num_params
from wandistiller.model import WanLiteTransformer2DModel, load_student_config, student_model_config
from wandistiller.pipeline import WanLitePipeline
from wandistiller.projection import project
from wandistiller.teacher import load_teacher

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
# The default student is sized for the real teachers; the small one for the embedded tiny teacher.
DEFAULT_STUDENT = CONFIG_DIR / "student_config.json"
SMALL_STUDENT = CONFIG_DIR / "student_config_small.json"
PROMPT = "a red fox sitting in fresh snow, looking at the camera"

# Real Wan 2.2 experts (diffusers transformer/config.json of the published checkpoints).
FULL_SIZE_TEACHERS = {
    "Wan2.2-T2V-A14B expert": (dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                    num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
                               8),   # VAE spatial factor
    "Wan2.2-TI2V-5B": (dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6),
                       16),
}




def tiny_students(teacher) -> dict[str, WanLiteTransformer2DModel]:
    """Students of the tiny teacher: its full size (projected exactly), half its depth, and the small config."""
    config = teacher.pipe.transformer.config
    head_dim, heads, depth = config.attention_head_dim, config.num_attention_heads, config.num_layers
    sizes = {
        "student full size": dict(hidden_size=heads * head_dim, depth=depth, num_heads=heads),
        "student half depth": dict(hidden_size=heads * head_dim, depth=max(1, depth // 2), num_heads=heads),
        f"student {SMALL_STUDENT.name}": load_student_config(SMALL_STUDENT),
    }
    return {name: project(teacher, size, expert="high_noise", width="truncate")[0] for name, size in sizes.items()}


def measured_table(size: int, steps: int, repeats: int, batch_size: int) -> None:
    teacher = load_teacher("tiny", device_strategy="cpu")
    wan = teacher.pipe
    wan.set_progress_bar_config(disable=True)
    prompts = [PROMPT] * batch_size
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    g, g2 = teacher.guidance_scale, teacher.guidance_scale_2
    common = dict(height=size, width=size, num_inference_steps=steps)

    def teacher_run(**kwargs):
        return lambda: wan(num_frames=1, guidance_scale=g, guidance_scale_2=g2, **common, **kwargs)

    latent_hw = (size // teacher.vae_scale_factor,) * 2
    rows = [("teacher (WanPipeline, CFG)", num_params(wan.transformer), forward_flops(wan.transformer, latent_hw), 2,
             images_per_second(teacher_run(prompt=prompts, output_type="pil"), batch_size, repeats),
             images_per_second(teacher_run(prompt_embeds=embeds, negative_prompt_embeds=negative,
                                           output_type="latent"), batch_size, repeats))]
    for name, student in tiny_students(teacher).items():
        pipe = WanLitePipeline.from_teacher(teacher, student)
        pipe.set_progress_bar_config(disable=True)
        rows.append((name, num_params(student), forward_flops(student, latent_hw), 1,
                     images_per_second(lambda: pipe(prompts, **common), batch_size, repeats),
                     images_per_second(lambda: pipe(prompt_embeds=embeds, output_type="latent", **common),
                                       batch_size, repeats)))

    print(f"\n## Measured on this CPU ({torch.get_num_threads()} threads): tiny Wan 2.2 A14B teacher, {size}x{size}, "
          f"{steps} steps, batch {batch_size}, median of {repeats}")
    print("Ratios are student / teacher (x = times faster or times fewer). Teacher: two experts, CFG "
          f"{g}/{g2} (2 forwards per step); students: guidance 1 (1 forward per step).\n")
    header = (f"{'model':<34} {'params':>8} {'fwd FLOPs':>10} {'fwd/step':>8} {'img/s e2e':>10} {'speedup':>8} "
              f"{'img/s denoise':>14} {'speedup':>8} {'FLOPs/img':>10}")
    print(header + "\n" + "-" * len(header))
    _, t_flops, t_fwd, t_e2e, t_denoise = rows[0][1:]
    for name, params, flops, fwd, e2e, denoise in rows:
        print(f"{name:<34} {params:>8,} {_si(flops):>10} {fwd:>8} {e2e:>10.2f} {e2e / t_e2e:>7.2f}x "
              f"{denoise:>14.2f} {denoise / t_denoise:>7.2f}x {t_flops * t_fwd / (flops * fwd):>9.1f}x")
    print("\n'FLOPs/img' = teacher denoising FLOPs per image / student's (same steps). 'speedup' = student img/s / "
          "teacher img/s. End-to-end includes the shared UMT5 encoding and VAE decoding, which bound the gain.")


def full_size_table(resolutions: tuple[int, ...], steps: int) -> None:
    print(f"\n## Full-size configs on the meta device (counted, not timed): real teacher vs {DEFAULT_STUDENT.name}; "
          f"one forward at batch 1, 512 text tokens; per image = {steps} steps, teacher with CFG (x2), "
          "student without\n")
    header = (f"{'teacher':<24} {'params':>9} {'student':>9} {'ratio':>6} {'res':>5} {'tokens':>6} "
              f"{'teacher fwd':>11} {'student fwd':>11} {'fwd ratio':>9} {'img ratio':>9}")
    print(header + "\n" + "-" * len(header))
    for teacher_name, (teacher_kwargs, vae_factor) in FULL_SIZE_TEACHERS.items():
        with torch.device("meta"):
            teacher = WanTransformer3DModel(**teacher_kwargs)
            student = WanLiteTransformer2DModel(**student_model_config(DEFAULT_STUDENT, teacher_kwargs))
        t_params, s_params = num_params(teacher), num_params(student)
        for res in resolutions:
            latent = (res // vae_factor,) * 2
            tokens = (latent[0] // 2) * (latent[1] // 2)
            t_flops = forward_flops(teacher, latent, device="meta")
            s_flops = forward_flops(student, latent, device="meta")
            print(f"{teacher_name:<24} {_si(t_params):>9} {_si(s_params):>9} {t_params / s_params:>5.1f}x {res:>5} "
                  f"{tokens:>6} {_si(t_flops):>11} {_si(s_flops):>11} {t_flops / s_flops:>8.1f}x "
                  f"{2 * t_flops / s_flops:>8.1f}x")
    print("\nratio = teacher / student. A student projected from A14B starts from one expert; the teacher samples "
          "with two (same size, switched by timestep), so per-image teacher cost is the same as one expert's.")


def _si(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps, the same for teacher and student")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024],
                        help="resolutions for the full-size FLOP table")
    args = parser.parse_args(argv)
    measured_table(args.size, args.steps, args.repeats, args.batch_size)
    full_size_table(tuple(args.resolutions), args.steps)


if __name__ == "__main__":
    main()
