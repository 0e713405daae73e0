"""The target cache at scale (issue 11): bytes per prompt, peak memory against the number of prompts, and training
throughput from the cache streamed off disk vs loaded into memory.

1. Bytes per prompt, before (float32 latents, v_cond and v_uncond, prompt embeddings padded to 512 tokens in
   float32 and kept twice: the cache's table and the per-prompt embedding files) and now (bf16, the guided velocity
   alone, embeddings once at their true length): measured on disk at the tiny defaults, and computed by
   `cache.cache_bytes_per_prompt` (what `wandistiller plan` prints) there and for Wan2.2-T2V-A14B at 512² and
   1024² (40 steps, embeddings in the teacher's bf16 at an assumed 100 tokens, the long end of a real prompt).
2. Peak resident memory of a whole `wandistiller distill` run (recording the cache, then training from it) at
   200 and at 3,000 prompts, each in its own process, same settings (2-step trajectories by default, to keep the
   benchmark short; `--max_steps` keeps training short: the memory a run holds does not depend on how long it
   trains).
3. Training throughput of the same loop (student forward, loss, backward, AdamW) on batches of the 200-prompt
   cache streamed from disk (`cache.TargetShards`, what `distill` reads) and loaded whole into memory
   (`cache.load_target_cache`), in the same shard-aware order, rounds alternating.

Run: `python benchmarks/cache_scale.py [--small 200] [--large 3000] [--inference-steps 2] [--steps 40]
[--rounds 2]`. Shared, noisy machine: compare the ratios of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wandistiller.cache import (
    ShardedShuffleSampler, build_target_cache, cache_bytes_per_prompt, load_target_cache, stream_target_cache,
)
from wandistiller.data import TargetSpec, read_prompts
from wandistiller.flow import MAX_SEQUENCE_LENGTH
from wandistiller.loops import DEFAULT_STUDENT_CONFIG
from wandistiller.loss import DistillLoss
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.teacher import load_teacher, read_teacher_info

A14B = dict(latent_channels=16, text_dim=4096)  # VAE factor 8
A14B_TEXT = dict(text_tokens=100, text_dtype="bfloat16")  # the teacher in bf16; a long real prompt
SETTINGS = ["--batch_size", "8", "--max_steps", "30", "--student_init", "random", "--no-save_samples",
            "--no-progress"]  # the CLI defaults otherwise (trajectories, guided targets, bf16 cache, ...)
_CHILD = """
import resource, sys
from wandistiller.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def before_bytes(spec: TargetSpec, **shape) -> float:
    """The layout before issue 11: float32 everywhere, both velocities, embeddings padded to 512 tokens in float32
    (as the issue and the plan of the time counted them) and stored twice."""
    old = TargetSpec(**{**spec.__dict__, "velocity": "both", "dtype": "float32"})
    padded = MAX_SEQUENCE_LENGTH * shape["text_dim"] * 4
    return cache_bytes_per_prompt(old, text_tokens=MAX_SEQUENCE_LENGTH, text_dtype="float32", **shape) + padded


def bytes_table(workdir: Path) -> None:
    from safetensors.torch import load_file

    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)
    prompts, spec, sizes = read_prompts(), TargetSpec(), {}
    for n in (8, 24):
        build_target_cache(teacher, prompts[:n], workdir / f"bytes{n}", spec, progress=False)
        sizes[n] = sum(f.stat().st_size for f in (workdir / f"bytes{n}").glob("*.safetensors"))
    measured = (sizes[24] - sizes[8]) / 16
    lengths = torch.cat([load_file(workdir / "bytes24" / f"text_0000{k}.safetensors")["lengths"] for k in (1, 2)])
    tokens = float(lengths.float().mean())  # of the 16 prompts the difference holds
    tiny = dict(latent_channels=16, latent_hw=(8, 8), text_dim=32)
    rows = [("tiny, 64², 8 steps (measured on disk)", before_bytes(spec, **tiny), measured),
            ("tiny, 64², 8 steps (computed)", before_bytes(spec, **tiny),
             cache_bytes_per_prompt(spec, text_tokens=tokens, **tiny))]
    for side in (512, 1024):
        shape = dict(A14B, latent_hw=(side // 8, side // 8))
        big = TargetSpec(height=side, width=side, num_inference_steps=40)
        rows.append((f"A14B, {side}², 40 steps (computed)", before_bytes(big, **shape),
                     cache_bytes_per_prompt(big, **shape, **A14B_TEXT)))
        fewer = TargetSpec(height=side, width=side, num_inference_steps=40, steps_per_trajectory=10)
        rows.append((f"A14B, {side}², 10 of 40 steps kept (computed)", rows[-1][1],
                     cache_bytes_per_prompt(fewer, **shape, **A14B_TEXT)))
    print("## Target cache bytes per prompt (one trajectory)")
    print(f"{'':<46}{'before':>14}{'now':>14}{'fewer':>8}")
    for name, old, new in rows:
        print(f"{name:<46}{old:>14,.0f}{new:>14,.0f}{old / new:>7.1f}x")
    print(f"(tiny prompts: {tokens:.1f} tokens on average; 100k A14B prompts at 512², 40 steps, now take "
          f"{rows[2][2] * 1e5 / 1e12:.2f} TB instead of {rows[2][1] * 1e5 / 1e12:.2f} TB)")


def peak_rss(workdir: Path, n: int, steps: int) -> tuple[float, float]:
    """(peak resident GB, seconds) of a whole distill run over `n` prompts, `steps` per trajectory, in a fresh
    process."""
    base = read_prompts()
    prompts = workdir / f"prompts{n}.txt"
    prompts.write_text("\n".join(f"{base[i % len(base)]}, take {i}" for i in range(n)), encoding="utf-8")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", _CHILD, "distill", "--data_path", str(prompts), "--output_dir",
                           str(workdir / f"run{n}"), "--num_inference_steps", str(steps), *SETTINGS],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {n}-prompt run failed: {done.stderr[-2000:]}")
    kb = int(done.stdout.split("PEAK_RSS_KB")[-1].split()[0])
    return kb / 1e6, time.time() - started


def memory_table(workdir: Path, small: int, large: int, steps: int) -> None:
    (a, ta), (b, tb) = peak_rss(workdir, small, steps), peak_rss(workdir, large, steps)
    print(f"\n## Peak resident memory of a `wandistiller distill` run (record {steps}-step trajectories, then train "
          "30 steps from the cache)")
    print(f"{'prompts':>8}{'peak RSS GB':>13}{'seconds':>9}")
    print(f"{small:>8,}{a:>13.3f}{ta:>9.0f}\n{large:>8,}{b:>13.3f}{tb:>9.0f}")
    print(f"{large:,} vs {small:,} prompts: {b / a:.2f}x (goal <= 1.2x; before issue 11: 0.75 -> 2.04 GB, 2.7x)")


def throughput_table(workdir: Path, small: int, steps: int, rounds: int) -> None:
    config = json.loads((workdir / f"run{small}" / "distill_config.json").read_text())
    prompts, info = read_prompts(config["data_path"]), read_teacher_info("tiny")
    spec = TargetSpec(height=64, width=64, num_inference_steps=config["num_inference_steps"])
    cache = workdir / f"run{small}" / "cache"
    sources = {"streamed": stream_target_cache(cache, info.fingerprint(), spec, prompts),
               "in memory": load_target_cache(cache, info.fingerprint(), spec, prompts)[0]}
    student = WanLiteTransformer2DModel.from_student_config(DEFAULT_STUDENT_CONFIG, info.transformer_config(), seed=0)
    optimizer, loss_fn = torch.optim.AdamW(student.parameters(), lr=1e-4), DistillLoss(cfg_distill=True)
    rates = {name: [] for name in sources}
    for round_ in range(rounds):
        for name, targets in sources.items():
            sampler = ShardedShuffleSampler(targets.shard_sizes, seed=round_)
            loader = torch.utils.data.DataLoader(targets, batch_size=8, sampler=sampler, drop_last=True)
            started = None
            for i, batch in enumerate(loader):
                if i == 2:  # the first batches warm up
                    started = time.perf_counter()
                pred = student(batch["latents"], batch["timesteps"], batch["prompt_embeds"]).sample
                loss_fn(pred.float(), batch["velocity"], batch["velocity"], batch["guidance"])["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i == steps + 1:
                    break
            rates[name].append(steps * 8 / (time.perf_counter() - started))
    rate = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n## Training throughput from the {small}-prompt cache (default student, batch 8, {rounds} rounds of {steps} "
          "steps each, alternating)")
    print(f"{'targets':<12}{'samples/s':>12}")
    for name in sources:
        print(f"{name:<12}{rate[name]:>12.1f}")
    print(f"streamed vs in memory: {rate['streamed'] / rate['in memory']:.2f}x (goal >= 0.9x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="prompts of the small run (default: 200)")
    parser.add_argument("--large", type=int, default=3000, help="prompts of the large run (default: 3000)")
    parser.add_argument("--inference-steps", type=int, default=2,
                        help="teacher steps per trajectory in the memory runs (default: 2; the CLI's 8 takes ~4x longer)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per round (default: 40)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per source (default: 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bytes_table(Path(tmp))
        memory_table(Path(tmp), args.small, args.large, args.inference_steps)
        throughput_table(Path(tmp), args.small, args.steps, args.rounds)


if __name__ == "__main__":
    main()
