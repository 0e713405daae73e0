import json
import warnings

import pytest
import torch
from diffusers import WanTransformer3DModel

from wandistiller.teacher import TeacherNotAvailableError, load_teacher, resolve_device_strategy

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
