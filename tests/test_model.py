"""Wan-Lite student model: 2D only, Wan-compatible, round-trips through save/from_pretrained, clear config errors."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from torch import nn

from wandistiller.model import (
    StudentConfig,
    WanLiteTransformer2DModel,
    load_student_config,
    student_model_config,
)
from wandistiller.toy import tiny_transformer_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
TINY = tiny_transformer_config("a14b")
A14B_EXPERT = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


def tiny_student(**overrides) -> WanLiteTransformer2DModel:
    config = {"hidden_size": 32, "depth": 2, "num_heads": 2, **overrides}
    return WanLiteTransformer2DModel.from_student_config(config, TINY, seed=0).eval()


def inputs(batch=2, channels=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=g), torch.tensor([100.0, 800.0])[:batch],
            torch.randn(batch, 512, TINY["text_dim"], generator=g))


def test_forward_shapes_outputs_and_hidden_states():
    model = tiny_student()
    x, t, text = inputs()
    out = model(x, t, text, output_hidden_states=True)
    assert out.sample.shape == x.shape
    assert len(out.hidden_states) == 2 and out.hidden_states[0].shape == (2, 16, 32)  # (8/2)^2 patches
    sample, hidden = model(x, t, text, return_dict=False, output_hidden_states=True)
    torch.testing.assert_close(sample, out.sample, rtol=0, atol=0)
    assert model(x, t, text, return_dict=False)[0].shape == x.shape
    assert len(model(x, t, text, return_dict=False)) == 1


def test_per_token_timesteps_match_per_sample_timesteps():
    model = tiny_student()
    x, t, text = inputs()
    per_token = t[:, None].expand(-1, 16)  # Wan 2.2 TI2V style: one timestep per patch
    torch.testing.assert_close(model(x, per_token, text).sample, model(x, t, text).sample, rtol=0, atol=1e-6)


def test_no_temporal_axis_anywhere_in_the_module_tree():
    model = WanLiteTransformer2DModel.from_student_config("config/student_config_small.json", TINY)
    for name, module in model.named_modules():
        kind = type(module).__name__
        assert not isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)), name
        assert not kind.endswith(("3d", "3D")), f"{name} is a {kind}"
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            assert tensor.ndim <= 4, f"{name}.{pname} has a {tensor.ndim}-D shape {tuple(tensor.shape)}"
    assert isinstance(model.patch_embedding, nn.Conv2d)
    assert len(model.config.patch_size) == 2
    with pytest.raises(ValueError, match="squeeze"):
        model(torch.randn(1, 16, 1, 8, 8), torch.tensor([500.0]), torch.randn(1, 512, 32))


def test_rope_equals_wan_rope_at_one_frame():
    """Teacher-compatible layout: Wan's h/w frequencies, the temporal dims unrotated (cos=1, sin=0)."""
    model = WanLiteTransformer2DModel(num_attention_heads=2, attention_head_dim=128, num_layers=1, ffn_dim=32,
                                      text_dim=8)
    wan = WanRotaryPosEmbed(128, (1, 2, 2), max_seq_len=64)
    cos, sin = model.rope(torch.zeros(1, 16, 24, 40))
    wan_cos, wan_sin = wan(torch.zeros(1, 16, 1, 24, 40))
    assert cos.shape == (1, 12 * 20, 1, 128)
    torch.testing.assert_close(cos, wan_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, wan_sin, rtol=0, atol=0)
    assert (cos[..., :44] == 1).all() and (sin[..., :44] == 0).all()


def test_rope_split_is_configurable():
    model = WanLiteTransformer2DModel(num_attention_heads=1, attention_head_dim=16, num_layers=1, ffn_dim=32,
                                      text_dim=8, rope_axes_dim=(8, 8))
    cos, sin = model.rope(torch.zeros(1, 16, 8, 8))
    assert model.rope.unrotated_dim == 0
    assert not (sin[0, 1:, 0] == 0).all()  # every dim rotates
    with pytest.raises(ValueError, match="rope_axes_dim"):
        WanLiteTransformer2DModel(num_attention_heads=1, attention_head_dim=16, rope_axes_dim=(10, 8))


def test_save_pretrained_from_pretrained_round_trip_is_exact(tmp_path):
    model = tiny_student()
    model.save_pretrained(tmp_path)
    loaded = WanLiteTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k[0] != "_"}
    assert public(loaded.config) == public(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x, t, text = inputs()
    torch.testing.assert_close(loaded(x, t, text).sample, model(x, t, text).sample, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_student().train()
    x, t, text = inputs()

    def grads():
        model.zero_grad()
        model(x, t, text).sample.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_config_files_load_and_fit_their_teachers():
    default = load_student_config(CONFIG_DIR / "student_config.json")
    kwargs = student_model_config(default, A14B_EXPERT)
    assert kwargs["attention_head_dim"] == 128 and kwargs["num_layers"] == 16
    assert kwargs["in_channels"] == 16 and kwargs["text_dim"] == 4096 and kwargs["patch_size"] == (2, 2)
    small = student_model_config(CONFIG_DIR / "student_config_small.json", TINY)
    assert small["attention_head_dim"] == TINY["attention_head_dim"]
    assert small["text_dim"] == TINY["text_dim"] and small["num_layers"] <= TINY["num_layers"]
    # teacher-bound values follow the teacher: the same config fits the 48-channel TI2V-5B layout
    assert student_model_config(default, {**A14B_EXPERT, "in_channels": 48, "out_channels": 48})["in_channels"] == 48


def test_original_tool_keys_are_accepted():
    original = {"model_type": "WanLiteStudent", "hidden_size": 1024, "depth": 16, "num_heads": 8, "num_channels": 16,
                "image_size": 1024, "patch_size": 2, "text_max_length": 512, "text_encoder_output_dim": 4096,
                "projection_factor": 1.0}
    kwargs = student_model_config(original, A14B_EXPERT)
    assert kwargs["num_attention_heads"] == 8 and kwargs["ffn_dim"] == 2752  # teacher FFN ratio 2.7 x 1024 -> 64s


@pytest.mark.parametrize("key, value, needed", [
    ("num_channels", 4, "16"),
    ("patch_size", 16, r"\(2, 2\)"),
    ("text_encoder_output_dim", 4096, "32"),
])
def test_a_value_contradicting_the_teacher_is_a_clear_error(key, value, needed):
    with pytest.raises(ValueError, match=rf"^student config {key}=.*contradicts the teacher.*{needed}") as err:
        student_model_config({"hidden_size": 16, "depth": 1, "num_heads": 1, key: value}, TINY)
    assert "\n" not in str(err.value)
    print(err.value)


def test_unknown_and_inconsistent_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="hiden_size"):
        load_student_config({"hiden_size": 16})
    with pytest.raises(ValueError, match="divisible"):
        student_model_config({"hidden_size": 30, "num_heads": 4}, TINY)
    path = tmp_path / "student.json"
    path.write_text(json.dumps({"_comment": "comments are skipped", "hidden_size": 64, "depth": 3, "num_heads": 4}))
    assert load_student_config(path) == StudentConfig(hidden_size=64, depth=3, num_heads=4)


def test_text_max_length_must_be_the_teachers_text_length():
    # The student sees WanPipeline's embeddings, padded to MAX_SEQUENCE_LENGTH: another length is not silently ignored.
    from wandistiller.flow import MAX_SEQUENCE_LENGTH

    assert load_student_config({"text_max_length": MAX_SEQUENCE_LENGTH}).text_max_length == MAX_SEQUENCE_LENGTH
    with pytest.raises(ValueError, match=rf"^student config text_max_length=77 contradicts the teacher: .* pads every "
                                         rf"prompt to {MAX_SEQUENCE_LENGTH} tokens; set text_max_length to "
                                         rf"{MAX_SEQUENCE_LENGTH} or leave it out$"):
        load_student_config({"text_max_length": 77})


def test_standalone_student_without_teacher_uses_wan_defaults():
    kwargs = student_model_config({"hidden_size": 256, "depth": 1, "num_heads": 2})
    assert kwargs["in_channels"] == 16 and kwargs["text_dim"] == 4096 and kwargs["patch_size"] == (2, 2)


def test_from_student_config_is_reproducible():
    a, b = tiny_student(), tiny_student()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
