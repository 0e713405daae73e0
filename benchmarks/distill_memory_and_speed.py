"""What distillation keeps in memory, and cached vs online training speed, printed as ratio tables.

1. Full size (meta device, no memory): parameters resident while the teacher targets are recorded — one
   Wan2.2-T2V-A14B expert (+ VAE), the text encoder freed after the prompts are encoded — against the original
   tool's design (both 14 B experts + UMT5-XXL + the student, all at once), and while training from the cache.
2. Tiny teacher (measured): the largest set of teacher parameters resident at any expert call while the cache
   is built, from the live Teacher object.
3. Tiny teacher (measured): training steps/s from the target cache (no teacher) vs online (teacher queried each
   batch), same targets and settings, one run each on this machine.

Run: `python benchmarks/distill_memory_and_speed.py`. Shared, noisy machine: compare ratios within one run.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from wandistiller.analysis import FULL_SIZE_EXPERTS
from wandistiller.cache import build_target_cache
from wandistiller.data import TargetSpec, read_prompts
from wandistiller.evaluate import num_params
from wandistiller.loops import DEFAULT_STUDENT_CONFIG, distill
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.teacher import load_teacher

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
A14B_EXPERT = FULL_SIZE_EXPERTS["a14b"]
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")


def full_size_table() -> None:
    with torch.device("meta"):
        expert = num_params(WanTransformer3DModel(**A14B_EXPERT))
        text_encoder = num_params(UMT5EncoderModel(UMT5Config(**UMT5_XXL)))
        vae = num_params(AutoencoderKLWan())
        teacher_config = dict(WanTransformer3DModel(**A14B_EXPERT).config)
        student = num_params(WanLiteTransformer2DModel.from_student_config(CONFIG_DIR / "student_config.json",
                                                                           teacher_config))
    original = 2 * expert + text_encoder + student
    rows = [("original tool: 2 experts + UMT5-XXL + student", original),
            ("recording targets: 1 expert + VAE", expert + vae),
            ("training from the cache: student + EMA copy", 2 * student)]
    print("## Resident parameters, full size (meta device)")
    print(f"{'phase':<48}{'parameters':>16}{'bf16 GiB':>10}{'vs original':>13}")
    for name, n in rows:
        print(f"{name:<48}{n:>16,}{n * 2 / 2**30:>10.1f}{original / n:>12.1f}x")


def tiny_resident_table(workdir: Path) -> None:
    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)
    prompts = read_prompts()[:8]
    teacher.encode_prompts(prompts, negative="")
    text_encoder = num_params(teacher.pipe.text_encoder)
    teacher.release_text_encoder()
    peak = 0
    real = teacher.expert_velocity

    def measure(name, *args):
        nonlocal peak
        peak = max(peak, sum(num_params(getattr(teacher.pipe, n)) for n in teacher.resident_experts()))
        return real(name, *args)

    teacher.expert_velocity = measure
    build_target_cache(teacher, prompts, workdir / "cache", TargetSpec(), progress=False)
    experts = sum(num_params(WanTransformer3DModel.from_pretrained(teacher.source, subfolder=n))
                  for n in teacher.expert_names)
    student = num_params(WanLiteTransformer2DModel.from_student_config(
        DEFAULT_STUDENT_CONFIG, teacher.transformer_config()))
    original = experts + text_encoder + student
    print("\n## Resident parameters while recording, tiny teacher (measured)")
    print(f"original design (both experts + text encoder + student): {original:,}")
    print(f"peak resident expert parameters during recording:         {peak:,}  ({original / peak:.1f}x fewer)")


def speed_table(workdir: Path) -> None:
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:16]), encoding="utf-8")
    common = dict(data_path=str(prompts), latent_source="noise", samples_per_prompt=8, batch_size=8,
                  num_epochs=2, student_init="random", ema_decay=0, progress=False, save_samples=False,
                  checkpoint_interval=10_000)
    rates = {}
    for mode in ("online", "cache"):
        result = distill(output_dir=str(workdir / mode), teacher_targets=mode, **common)
        rates[mode] = statistics.median(m["samples_per_s"] for m in result.metrics[2:])
    print("\n## Training throughput, tiny teacher, small student (this machine, one run)")
    print(f"{'targets':<10}{'samples/s':>12}{'ratio':>8}")
    for mode in ("online", "cache"):
        print(f"{mode:<10}{rates[mode]:>12.1f}{rates[mode] / rates['online']:>7.2f}x")


if __name__ == "__main__":
    full_size_table()
    with tempfile.TemporaryDirectory() as tmp:
        tiny_resident_table(Path(tmp))
        speed_table(Path(tmp))
