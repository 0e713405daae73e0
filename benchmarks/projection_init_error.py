"""How good is a projected student before any training, and what does the default student cost?

1. Initial error on the embedded tiny teacher: relative velocity-matching MSE, ||v_student - v_teacher||^2 /
   ||v_teacher||^2, of a width-reduced student from each projection method, against random initialisation.
   Averaged over held-out latents, prompts and timesteps (the calibration uses other ones).
2. Parameters and FLOPs per 1024^2 forward: the default student against one Wan 2.2 A14B expert, counted
   on the meta device (no memory, no weights).

    .venv/bin/python benchmarks/projection_init_error.py [--variant a14b|ti2v-5b|2.1] [--seeds 8]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from torch.utils.flop_counter import FlopCounterMode

from wandistiller.data import read_prompts
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.projection import project
from wandistiller.teacher import load_teacher
from wandistiller.toy import tiny_wan_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
A14B_EXPERT = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


@torch.no_grad()
def relative_error(student, teacher, seed: int, prompts: list[str], t_range: tuple[float, float]) -> float:
    g = torch.Generator().manual_seed(1000 + seed)
    latents = torch.randn(4, teacher.latent_channels, 1, 16, 16, generator=g)
    t = t_range[0] + torch.rand(4, generator=g) * (t_range[1] - t_range[0])
    text = teacher.encode_prompts([prompts[(4 * seed + i) % len(prompts)] for i in range(4)])
    target = teacher.velocity(latents, t, text)[:, :, 0]
    tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    timestep = t[:, None].expand(-1, tokens) if teacher.expand_timesteps else t
    prediction = student(latents[:, :, 0], timestep, text).sample
    return ((prediction - target).square().mean() / target.square().mean()).item()


def init_error_table(variant: str, config_path: Path, seeds: int) -> None:
    teacher = load_teacher(tiny_wan_path(variant))
    prompts = read_prompts()
    boundary = teacher.boundary_timestep or 1000.0
    t_range = (20.0, boundary - 1)  # the low-noise expert's timesteps (all of them for one-expert teachers)
    students = {w: [project(teacher, config_path, width=w)[0]] for w in ("importance", "truncate", "svd")}
    students["random init"] = [WanLiteTransformer2DModel.from_student_config(
        config_path, teacher.transformer_config(), seed=i) for i in range(3)]
    student = students["importance"][0]
    print(f"\nInitial error, tiny {variant} teacher ({teacher.transformer_config()['num_attention_heads']} heads x "
          f"{teacher.transformer_config()['attention_head_dim']}, {teacher.transformer_config()['num_layers']} blocks) "
          f"-> {config_path.name} ({student.config.num_attention_heads} head, {student.config.num_layers} blocks), "
          f"t in [{t_range[0]:.0f}, {t_range[1]:.0f}], {seeds} seeds x 4 prompts/latents:")
    print(f"{'method':<14}{'rel. MSE mean':>15}{'std':>9}{'vs importance':>15}")
    means = {}
    for method, models in students.items():
        errors = [relative_error(m, teacher, s, prompts, t_range) for m in models for s in range(seeds)]
        means[method] = statistics.mean(errors)
        print(f"{method:<14}{means[method]:>15.4f}{statistics.stdev(errors):>9.4f}"
              f"{means[method] / means['importance']:>14.2f}x")


def forward_flops(model, latents: torch.Tensor, text_dim: int) -> int:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(latents, torch.empty(1), torch.empty(1, 512, text_dim))
    return counter.get_total_flops()


def cost_table(config_path: Path) -> None:
    with torch.device("meta"):
        teacher = WanTransformer3DModel(**A14B_EXPERT)
    student, report = project(teacher, config_path)
    latent = 1024 // 8  # Wan 2.1 VAE: 8x spatial compression -> 128x128 latents, 4096 tokens at patch 2
    with torch.device("meta"):
        flops_t = forward_flops(teacher, torch.empty(1, 16, 1, latent, latent), 4096)
        flops_s = forward_flops(student, torch.empty(1, 16, latent, latent), 4096)
    params_t, params_s = report.teacher_parameters, report.student_parameters
    print(f"\nCost per 1024x1024 forward (4096 tokens), meta device; student = {config_path.name} "
          f"({student.config.num_layers} blocks x {student.config.num_attention_heads * student.config.attention_head_dim} wide):")
    print(f"{'model':<22}{'parameters':>18}{'TFLOP':>10}")
    print(f"{'A14B expert':<22}{params_t:>18,}{flops_t / 1e12:>10.1f}")
    print(f"{'default student':<22}{params_s:>18,}{flops_s / 1e12:>10.2f}")
    print(f"{'ratio teacher/student':<22}{params_t / params_s:>17.1f}x{flops_t / flops_s:>9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="a14b", choices=["a14b", "ti2v-5b", "2.1"])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--config", type=Path, default=CONFIG_DIR / "student_config_small.json")
    args = parser.parse_args()
    init_error_table(args.variant, args.config, args.seeds)
    cost_table(CONFIG_DIR / "student_config.json")


if __name__ == "__main__":
    main()
