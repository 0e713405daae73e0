import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from wandistiller.teacher import (
    DevicePlan, TeacherNotAvailableError, load_teacher, plan_teacher_device, read_model_index, resolve_device_strategy,
)
from wandistiller.toy import tiny_wan_path

PROMPTS = ["a red fox sitting in fresh snow", "a gothic cathedral interior with stained glass windows"]


def test_variants_are_detected(tiny_teacher, tiny_ti2v_teacher):
    assert tiny_teacher.variant == "a14b"
    assert tiny_teacher.expert_names == ["transformer", "transformer_2"]
    assert tiny_ti2v_teacher.variant == "ti2v-5b" and tiny_ti2v_teacher.expand_timesteps
    assert tiny_ti2v_teacher.latent_channels == 48
    assert load_teacher("tiny-2.1", device_strategy="cpu").variant == "2.1"


def test_expert_switch_follows_the_boundary(tiny_teacher):
    assert tiny_teacher.boundary_timestep == 875.0
    assert tiny_teacher.expert_for_timestep(999) == "transformer"
    assert tiny_teacher.expert_for_timestep(875) == "transformer"
    assert tiny_teacher.expert_for_timestep(874.9) == "transformer_2"
    assert tiny_teacher.expert_for_timestep(0) == "transformer_2"
    assert tiny_teacher.guidance_for_expert("transformer") == tiny_teacher.guidance_scale
    assert tiny_teacher.guidance_for_expert("transformer_2") == tiny_teacher.guidance_scale_2


def test_velocity_equals_the_chosen_expert(tiny_teacher):
    torch.manual_seed(0)
    embeds, negative = tiny_teacher.encode_prompts(PROMPTS, negative="")
    latents = torch.randn(tiny_teacher.latent_shape(2, 64, 64))
    t = torch.tensor([950.0, 300.0])  # one sample for each expert in the same batch
    v = tiny_teacher.velocity(latents, t, embeds)
    for i, name in enumerate(["transformer", "transformer_2"]):
        direct = tiny_teacher.pipe.__getattribute__(name)(
            hidden_states=latents[i:i + 1], timestep=t[i:i + 1], encoder_hidden_states=embeds[i:i + 1]).sample
        torch.testing.assert_close(v[i:i + 1], direct, rtol=0, atol=0)
    # With CFG: uncond + g * (cond - uncond), g the expert's own scale.
    guided = tiny_teacher.velocity(latents, t, embeds, negative)
    uncond = tiny_teacher.velocity(latents, t, negative)
    g = torch.tensor([tiny_teacher.guidance_scale, tiny_teacher.guidance_scale_2]).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(guided, uncond + g * (v - uncond))
    assert not torch.allclose(v[0], tiny_teacher.expert_velocity("transformer_2", latents[:1], t[:1], embeds[:1])[0])


def test_ti2v_velocity_uses_per_token_timesteps(tiny_ti2v_teacher):
    teacher = tiny_ti2v_teacher
    embeds = teacher.encode_prompts(PROMPTS[:1])
    latents = torch.randn(teacher.latent_shape(1, 64, 64))
    v = teacher.velocity(latents, 500.0, embeds)
    tokens = latents.shape[3] // 2 * latents.shape[4] // 2
    direct = teacher.pipe.transformer(hidden_states=latents, timestep=torch.full((1, tokens), 500.0),
                                      encoder_hidden_states=embeds).sample
    torch.testing.assert_close(v, direct, rtol=0, atol=0)


def test_cached_embeddings_equal_the_pipeline(tmp_path):
    teacher = load_teacher("tiny", device_strategy="cpu", cache_dir=tmp_path)
    ref, _ = teacher.pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512,
                                        device="cpu")
    embeds = teacher.encode_prompts(PROMPTS)
    assert embeds.shape == (2, 512, 32)
    torch.testing.assert_close(embeds, ref, rtol=0, atol=1e-6)
    # cut to the true token length, zero-padded to 512
    n = len(teacher.pipe.tokenizer(PROMPTS[0]).input_ids)
    assert embeds[0, n:].abs().sum() == 0 and embeds[0, n - 1].abs().sum() > 0
    # a new teacher with the text encoder released reads the very same tensors from disk
    fresh = load_teacher("tiny", device_strategy="cpu", cache_dir=tmp_path)
    fresh.release_text_encoder()
    assert fresh.pipe.text_encoder is None
    assert torch.equal(fresh.encode_prompts(PROMPTS), embeds)
    with pytest.raises(RuntimeError, match="not cached"):
        fresh.encode_prompts(["a prompt nobody encoded"])


def test_lazy_experts_keep_one_resident():
    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)
    assert teacher.resident_experts() == []
    with teacher.only_expert("transformer"):
        assert teacher.resident_experts() == ["transformer"]
    with teacher.only_expert("transformer_2"):
        assert teacher.resident_experts() == ["transformer_2"]
    assert teacher.transformer_config("transformer")["num_layers"] == 4


def test_gpu_strategies_fall_back_on_cpu_with_one_warning():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_device_strategy("balanced") == "cpu"
    assert len(caught) == 1 and "GPU" in str(caught[0].message)
    assert resolve_device_strategy("cuda", teacher_on_cpu=True) == "cpu"
    with pytest.raises(ValueError, match="unknown device strategy"):
        resolve_device_strategy("tpu")


def test_dtypes(tmp_path):
    teacher = load_teacher("tiny", device_strategy="cpu", dtype="bfloat16")
    assert teacher.pipe.transformer.dtype == torch.bfloat16
    embeds = teacher.encode_prompts(PROMPTS[:1])
    v = teacher.velocity(torch.randn(teacher.latent_shape(1, 32, 32)), 500.0, embeds)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_teacher(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_teacher(corrupt)
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not a Wan pipeline"):
        load_teacher(other)
    with pytest.raises(TeacherNotAvailableError, match="not available"):
        load_teacher("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    with pytest.raises(ValueError, match="multiples of 16"):
        load_teacher("tiny").latent_shape(1, 60, 64)


def _meta_params(**config):
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    return sum(p.numel() for p in model.parameters())


def test_full_size_configs_on_meta_device():
    a14b = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40)
    ti2v = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30)
    assert _meta_params(**a14b) == 14_288_491_584
    assert _meta_params(**ti2v) == 4_999_787_712


HUB_ID = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache (HF_HUB_CACHE layout: models--org--name/refs/main + snapshots/<commit>/) that holds
    the tiny A14B teacher under the real A14B hub id, and no network."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_wan_path("a14b"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_hub_id_from_the_local_cache_is_read_like_diffusers_reads_it(hub_cache):
    # What distill() does: experts deferred. The variant comes from the cached model_index.json.
    teacher = load_teacher(HUB_ID, device_strategy="cpu", load_experts=False)
    assert teacher.variant == "a14b" and teacher.expert_names == ["transformer", "transformer_2"]
    assert (teacher.guidance_scale, teacher.guidance_scale_2) == (4.0, 3.0)
    assert teacher.expert_for_role("low_noise") == "transformer_2"
    assert Path(teacher.source) == hub_cache.resolve() or Path(teacher.source) == hub_cache
    assert read_model_index(Path(teacher.source))["boundary_ratio"] == 0.875  # what sample saving reads
    # every sample is routed: one batch across the boundary equals each expert's own output, bit for bit
    embeds = teacher.encode_prompts(PROMPTS)
    latents = torch.randn(teacher.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([950.0, 300.0])
    v = teacher.velocity(latents, t, embeds)
    for i, name in enumerate(["transformer", "transformer_2"]):
        direct = teacher.expert_velocity(name, latents[i:i + 1], t[i:i + 1], embeds[i:i + 1])
        torch.testing.assert_close(v[i:i + 1], direct, rtol=0, atol=0)


def test_a_sample_no_expert_takes_is_an_error_not_uninitialised_memory(hub_cache):
    teacher = load_teacher(HUB_ID, device_strategy="cpu", load_experts=False)
    # the state the hub id used to produce: an A14B pipeline (boundary 875) taken for a one-expert 2.1 teacher
    wrong = dataclasses.replace(teacher, variant="2.1")
    embeds = teacher.encode_prompts(PROMPTS[:1])
    latents = torch.randn(teacher.latent_shape(1, 32, 32))
    with pytest.raises(RuntimeError, match="belongs to expert 'transformer_2'"):
        wrong.velocity(latents, torch.tensor([300.0]), embeds)


def test_device_plan_follows_local_rank():
    # torchrun --nproc_per_node=4 on a 4-GPU machine: one teacher per rank, each on its own GPU
    for strategy in ("cuda", "auto"):
        plans = [plan_teacher_device(strategy, local_rank=r, local_world_size=4, gpu_count=4) for r in range(4)]
        assert [p.device for p in plans] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        assert not any(p.shared for p in plans) and all(p.loads_teacher for p in plans)
    # gpu0: one copy on GPU 0, loaded by local rank 0 only
    gpu0 = [plan_teacher_device("gpu0", local_rank=r, local_world_size=4, gpu_count=4) for r in range(4)]
    assert gpu0 == [DevicePlan("cuda:0", shared=True, loads_teacher=r == 0) for r in range(4)]
    assert plan_teacher_device("gpu0", gpu_count=4) == DevicePlan("cuda:0")
    # one process: balanced over all GPUs (auto with several), cuda:0 with one
    assert plan_teacher_device("auto", gpu_count=2).device == "balanced"
    assert plan_teacher_device("balanced", gpu_count=2).device == "balanced"
    assert plan_teacher_device("auto", gpu_count=1).device == "cuda:0"
    assert plan_teacher_device("cuda", local_rank=1, local_world_size=2, gpu_count=4, teacher_on_cpu=True).device == "cpu"
    with pytest.raises(ValueError, match="'balanced' .* cannot serve 4 ranks per machine: use 'cuda'") as err:
        plan_teacher_device("balanced", local_rank=1, local_world_size=4, gpu_count=4)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but only 2 GPU"):
        plan_teacher_device("cuda", local_rank=2, local_world_size=3, gpu_count=2)


def test_gpu0_rank_other_than_local_rank_0_never_loads_a_copy(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device_strategy("cuda") == "cuda:1"
    with pytest.raises(ValueError, match="local rank 1 must not load another copy"):
        load_teacher("tiny", device_strategy="gpu0")


def test_guidance_follows_wan_pipeline():
    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False, guidance_scale=2.0)
    assert (teacher.guidance_scale, teacher.guidance_scale_2) == (2.0, 2.0)  # the second expert uses the same value
    both = load_teacher("tiny", device_strategy="cpu", load_experts=False, guidance_scale=2.0, guidance_scale_2=6.0)
    assert [both.guidance_for_expert(n) for n in both.expert_names] == [2.0, 6.0] and both.uses_cfg
    off = load_teacher("tiny", device_strategy="cpu", load_experts=False, guidance_scale=1.0, guidance_scale_2=6.0)
    assert not off.uses_cfg and [off.guidance_for_expert(n) for n in off.expert_names] == [1.0, 1.0]
    with pytest.raises(ValueError, match="guidance_scale_2 is the low-noise expert's scale"):
        load_teacher("tiny-2.1", device_strategy="cpu", guidance_scale_2=3.0)


def test_guidance_at_most_1_makes_no_unconditional_pass(tiny_teacher):
    teacher = dataclasses.replace(tiny_teacher, guidance_scale=0.5, guidance_scale_2=0.5)
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    latents = torch.randn(teacher.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([950.0, 300.0])
    calls = []
    real = teacher.expert_velocity
    teacher.expert_velocity = lambda name, *args: calls.append(name) or real(name, *args)
    guided = teacher.velocity(latents, t, embeds, negative)
    assert calls == ["transformer", "transformer_2"]  # one pass per expert: conditional only
    torch.testing.assert_close(guided, teacher.velocity(latents, t, embeds), rtol=0, atol=0)


def test_broken_teacher_files_are_named(tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_wan_path("a14b"), broken)
    weights = broken / "transformer_2" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # an interrupted download
    teacher = load_teacher(broken, device_strategy="cpu", load_experts=False)  # the experts are not read yet
    with pytest.raises(ValueError, match=f"{weights} is corrupt or truncated .*: re-download it"):
        teacher.load_expert("transformer_2")
    with pytest.raises(ValueError, match=f"{weights} is corrupt or truncated"):
        load_teacher(broken, device_strategy="cpu")
    config = broken / "vae" / "config.json"
    config.write_text('{\n  "base_dim": 4,\n  "z_dim" 16\n}')
    with pytest.raises(ValueError, match=f"{config} is corrupt: not valid JSON at line 3, column 11"):
        load_teacher(broken, device_strategy="cpu", load_experts=False)


def test_expert_velocities_are_one_experts_conditional_and_unconditional_passes(tiny_teacher):
    teacher = tiny_teacher
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    latents = torch.randn(teacher.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0, 500.0])
    blocks = teacher.pipe.transformer_2.blocks
    seen = []
    hooks = [block.register_forward_hook(lambda m, a, out: seen.append(out.clone())) for block in blocks]
    try:
        out = teacher.expert_velocities("transformer_2", latents, t, embeds, negative, capture_blocks=True)
    finally:
        for hook in hooks:
            hook.remove()
    cond = teacher.expert_velocity("transformer_2", latents, t, embeds)
    torch.testing.assert_close(out.v_cond, cond, rtol=0, atol=0)
    torch.testing.assert_close(out.v_uncond, teacher.expert_velocity("transformer_2", latents, t, negative),
                               rtol=0, atol=0)
    # the block outputs are those of the conditional pass (the first len(blocks) seen), and no hook stays behind
    assert len(out.blocks) == len(blocks) and not any(block._forward_hooks for block in blocks)
    for captured, expected in zip(out.blocks, seen[:len(blocks)]):
        torch.testing.assert_close(captured, expected, rtol=0, atol=0)
    # without negative embeddings there is no unconditional pass: v_uncond is v_cond
    alone = teacher.expert_velocities("transformer_2", latents, t, embeds)
    assert alone.v_uncond is alone.v_cond and alone.blocks is None
    torch.testing.assert_close(alone.v_cond, cond, rtol=0, atol=0)


def test_query_answers_each_sample_with_its_own_expert(tiny_teacher):
    teacher = tiny_teacher
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    latents = torch.randn(teacher.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(3))[:, :, 0]
    t = torch.tensor([300.0, 950.0])  # low-noise first: the batch order is not the expert order
    out = teacher.query(latents, t, embeds, negative, capture_blocks=True)
    for i, name in ((0, "transformer_2"), (1, "transformer")):
        one = teacher.expert_velocities(name, latents[i:i + 1, :, None], t[i:i + 1], embeds[i:i + 1],
                                        negative[i:i + 1], capture_blocks=True)
        torch.testing.assert_close(out.v_cond[i:i + 1], one.v_cond[:, :, 0], rtol=0, atol=0)
        torch.testing.assert_close(out.v_uncond[i:i + 1], one.v_uncond[:, :, 0], rtol=0, atol=0)
        assert out.guidance[i] == teacher.guidance_for_expert(name)
        for feature, block in zip(out.features, one.blocks):
            torch.testing.assert_close(feature[i:i + 1], block, rtol=0, atol=0)
    # CFG off: no unconditional pass, so the unconditional target is the conditional one and guidance is 1
    off = dataclasses.replace(teacher, guidance_scale=1.0, guidance_scale_2=1.0)
    plain = off.query(latents, t, embeds, negative)
    assert torch.equal(plain.v_uncond, plain.v_cond) and torch.equal(plain.v_cond, out.v_cond)
    assert plain.guidance.tolist() == [1.0, 1.0] and plain.features is None


def test_the_tiny_teacher_is_rebuilt_when_its_prompts_change(tmp_path, monkeypatch):
    import wandistiller.toy

    before = tiny_wan_path("2.1")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zebracorn grazing on a hill\n", encoding="utf-8")
    monkeypatch.setattr(wandistiller.toy, "DEFAULT_PROMPTS_PATH", prompts)
    after = tiny_wan_path("2.1")
    assert after != before and (before / "model_index.json").is_file()
    vocabulary = load_teacher(after, device_strategy="cpu", load_experts=False).pipe.tokenizer.get_vocab()
    assert "▁zebracorn" in vocabulary
