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
from pathlib import Path

from wandistiller.analysis import initial_errors, meta_expert
from wandistiller.evaluate import forward_flops
from wandistiller.projection import project
from wandistiller.teacher import load_teacher
from wandistiller.toy import tiny_wan_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def init_error_table(variant: str, config_path: Path, seeds: int) -> None:
    teacher = load_teacher(tiny_wan_path(variant))
    tc = teacher.transformer_config()
    print(f"\nInitial error, tiny {variant} teacher ({tc['num_attention_heads']} heads x {tc['attention_head_dim']}, "
          f"{tc['num_layers']} blocks) -> {config_path.name}, {seeds} seeds:")
    print(initial_errors(teacher, config_path, seeds=seeds))


def cost_table(config_path: Path) -> None:
    teacher = meta_expert("a14b")
    student, report = project(teacher, config_path)
    latent_hw = (1024 // 8, 1024 // 8)  # Wan 2.1 VAE: 8x spatial compression -> 4096 tokens at patch 2
    flops_t = forward_flops(teacher, latent_hw, device="meta")
    flops_s = forward_flops(student, latent_hw, device="meta")
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
