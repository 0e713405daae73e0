"""GPU check: full-size A14B expert vs the default Wan-Lite student, and distill() end to end on a GPU.

1. Forward latency (bf16, batch 1, 512 text tokens) of one real-size Wan2.2-T2V-A14B expert (random weights:
   speed does not depend on their values) against the student of config/student_config.json, at 512² and
   1024², and the per-image cost at 40 sampling steps (teacher: CFG, two forwards per step; student: one).
2. Training throughput of the default student: AdamW step with bf16 autocast, with and without gradient
   checkpointing, batch 8 at 512², and peak GPU memory.
3. distill() on the embedded tiny teacher with the teacher and student on the GPU (code-path check).

Run on a machine with a CUDA GPU: `python benchmarks/gpu_bench.py`. Prints the card with every figure.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from wandistiller.analysis import FULL_SIZE_EXPERTS
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.loops import distill

ROOT = Path(__file__).resolve().parent.parent
A14B_EXPERT = FULL_SIZE_EXPERTS["a14b"]


def timed(fn, warmup=2, iters=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def forward_table(card: str) -> None:
    with torch.device("cuda"):
        teacher = WanTransformer3DModel(**A14B_EXPERT).to(torch.bfloat16).eval()
        student = WanLiteTransformer2DModel.from_student_config(ROOT / "config" / "student_config.json",
                                                                dict(teacher.config)).to(torch.bfloat16).eval()
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device="cuda")
    print(f"## Forward latency, bf16, batch 1 ({card})")
    print(f"{'res':>6}{'teacher ms':>12}{'student ms':>12}{'fwd ratio':>11}{'image ratio (40 steps, CFG)':>30}")
    for res in (512, 1024):
        x = torch.randn(1, 16, 1, res // 8, res // 8, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            tt = timed(lambda: teacher(x, t, text, return_dict=False))
            ts = timed(lambda: student(x[:, :, 0], t, text, return_dict=False))
        print(f"{res:>6}{tt * 1e3:>12.1f}{ts * 1e3:>12.1f}{tt / ts:>10.1f}x{2 * tt / ts:>29.1f}x")
    del teacher, student
    torch.cuda.empty_cache()


def training_table(card: str) -> None:
    print(f"\n## Default student training step, AdamW, bf16 autocast, batch 8 at 512² ({card})")
    print(f"{'grad ckpt':>10}{'step ms':>10}{'samples/s':>11}{'peak GiB':>10}")
    for checkpointing in (False, True):
        with torch.device("cuda"):
            student = WanLiteTransformer2DModel.from_student_config(ROOT / "config" / "student_config.json",
                                                                    A14B_EXPERT)
        if checkpointing:
            student.enable_gradient_checkpointing()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        x = torch.randn(8, 16, 64, 64, device="cuda")
        text = torch.randn(8, 512, 4096, device="cuda")
        t = torch.rand(8, device="cuda") * 1000
        target = torch.randn_like(x)
        torch.cuda.reset_peak_memory_stats()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = student(x, t, text).sample
            loss = (pred.float() - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds = timed(step, warmup=2, iters=5)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{str(checkpointing):>10}{seconds * 1e3:>10.1f}{8 / seconds:>11.1f}{peak:>10.1f}")
        del student, opt
        torch.cuda.empty_cache()


def distill_check(card: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = distill(output_dir=tmp, teacher_device_strategy="cuda", num_epochs=1, batch_size=8, lr=2e-3,
                         progress=False, checkpoint_interval=1000)
        seconds = time.perf_counter() - start
        losses = [m["loss"] for m in result.metrics]
        print(f"\n## distill() on the tiny teacher, GPU ({card}): {result.steps} steps in {seconds:.1f} s; "
              f"loss {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f}; "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB; student saved: "
              f"{(result.student_path / 'config.json').is_file()}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    card = torch.cuda.get_device_name(0)
    print(json.dumps({"card": card, "torch": torch.__version__}))
    forward_table(card)
    training_table(card)
    distill_check(card)
