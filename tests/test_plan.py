"""The recording cost plan (wandistiller.plan) against what recording really does on the tiny teacher."""

import pytest

from wandistiller.cache import build_target_cache
from wandistiller.data import TargetSpec
from wandistiller.plan import make_plan
from wandistiller.teacher import load_teacher

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen", "a paper boat"]
STEPS = 6


def _recorded_bytes(teacher, prompts, folder) -> tuple[int, dict]:
    """Bytes on disk of a target cache for `prompts` (target shards and prompt embeddings)."""
    from safetensors.torch import load_file

    cache = folder / "cache"
    build_target_cache(teacher, prompts, cache, TargetSpec(num_inference_steps=STEPS, shard_prompts=8), progress=False)
    timesteps = load_file(cache / "shard_00000.safetensors")["timesteps"]
    return sum(f.stat().st_size for f in cache.glob("*.safetensors")), timesteps


def test_plan_matches_a_real_recording(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    plan = make_plan("tiny", prompts_file, height=64, width=64, num_inference_steps=STEPS)
    sizes = {}
    for n in (2, 4):
        folder = tmp_path / f"run{n}"
        teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)
        sizes[n], timesteps = _recorded_bytes(teacher, PROMPTS[:n], folder)
    # steps per expert: the sampler's own timesteps on either side of the boundary
    boundary = teacher.boundary_timestep
    assert plan.steps_per_expert == {"transformer": int((timesteps >= boundary).sum()) // 4,
                                     "transformer_2": int((timesteps < boundary).sum()) // 4}
    assert len(timesteps) == 4 * STEPS and plan.trajectories == 4
    # every recorded step queries cond and uncond (the tiny teacher guides both experts)
    assert teacher.guidance_for_expert("transformer") > 1 and teacher.guidance_for_expert("transformer_2") > 1
    assert plan.teacher_forwards == 4 * STEPS * 2
    # bytes per prompt: the difference between 4 and 2 prompts on disk, headers aside (the plan counts the mean
    # token length of all 4 prompts, the difference holds the last 2)
    per_prompt = (sizes[4] - sizes[2]) / 2
    assert plan.bytes_per_prompt == pytest.approx(per_prompt, rel=0.02)
    assert plan.total_tflop > 0 and plan.gpu_hours == pytest.approx(plan.total_tflop / plan.tflops / 3600)
    assert "teacher forwards" in str(plan.table())


def test_plan_refuses_sizes_the_teacher_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="multiples of 16"):
        make_plan("tiny", height=72, width=64)
    with pytest.raises(ValueError, match="use at most 512 pixels a side"):
        make_plan("tiny", height=1024, width=64)
    with pytest.raises(ValueError, match="tflops=0 must be positive"):
        make_plan("tiny", tflops=0)


def test_full_size_a14b_plan_from_configs_only(tmp_path, capsys):
    """A folder with only the JSON files of Wan2.2-T2V-A14B (no weights): the plan counts on the meta device."""
    import json
    import shutil

    from wandistiller.analysis import FULL_SIZE_EXPERTS
    from wandistiller.cli import main
    from wandistiller.teacher import locate_teacher

    source, folder = locate_teacher("tiny"), tmp_path / "a14b-configs"
    for file in source.rglob("*.json"):
        (folder / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, folder / file.relative_to(source))
    for name in ("transformer", "transformer_2"):
        config = {**json.loads((folder / name / "config.json").read_text()), **FULL_SIZE_EXPERTS["a14b"]}
        (folder / name / "config.json").write_text(json.dumps({**config, "patch_size": [1, 2, 2]}))
    assert not list(folder.rglob("*.safetensors"))
    plan = make_plan(str(folder), height=512, width=512, num_inference_steps=40, tflops=100)
    # one full-size expert forward at 512² (4096 latent pixels / 1024 tokens) is tens of TFLOP, both experts alike
    assert 10 < plan.forward_tflop["transformer"] == plan.forward_tflop["transformer_2"] < 100
    assert plan.guidance == {"transformer": 4.0, "transformer_2": 3.0}  # Wan 2.2 A14B's defaults
    assert plan.teacher_forwards == plan.trajectories * 40 * 2
    assert plan.gpu_hours == pytest.approx(plan.teacher_forwards * plan.forward_tflop["transformer"] / 100 / 3600)
    assert main(["plan", "--height", "64", "--width", "64", "--num_inference_steps", "4"]) == 0
    assert "GPU-hours" in capsys.readouterr().out
    assert main(["plan", "--teacher_path", str(folder), "--height", "500"]) == 2
    assert "multiples of 16" in capsys.readouterr().err
