"""Teacher -> student projection: exact at full size, the skipped-blocks teacher at reduced depth, better than
random and than the original tool's truncation at reduced width, and free on the meta device at full scale."""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch import nn

from wandistiller.data import read_prompts
from wandistiller.model import WanLiteTransformer2DModel, student_model_config
from wandistiller.projection import (
    Calibration,
    ProjectionReport,
    make_calibration,
    measure_importance,
    project,
    select_layers,
)
from wandistiller.teacher import load_teacher
from wandistiller.toy import tiny_transformer_config, tiny_wan_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
A14B_EXPERT = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


@pytest.fixture(scope="module")
def a14b():
    return load_teacher(tiny_wan_path("a14b"))


@pytest.fixture(scope="module")
def ti2v():
    return load_teacher(tiny_wan_path("ti2v-5b"))


def full_size(teacher) -> dict:
    cfg = teacher.transformer_config()
    return {"hidden_size": cfg["num_attention_heads"] * cfg["attention_head_dim"], "depth": cfg["num_layers"],
            "num_heads": cfg["num_attention_heads"], "ffn_dim": cfg["ffn_dim"]}


def latents_and_text(teacher, timesteps, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    prompts = read_prompts()
    latents = torch.randn(len(timesteps), teacher.latent_channels, 1, size, size, generator=g)
    text = teacher.encode_prompts([prompts[(seed * 7 + i) % len(prompts)] for i in range(len(timesteps))])
    return latents, torch.tensor(timesteps), text


@torch.no_grad()
def student_velocity(student, latents, timesteps, text, per_token=False):
    """The student on the teacher's single-frame latents; per_token repeats t per patch as Wan 2.2 TI2V does."""
    if per_token:
        p_h, p_w = student.config.patch_size
        timesteps = timesteps[:, None].expand(-1, latents.shape[-2] // p_h * latents.shape[-1] // p_w)
    return student(latents[:, :, 0], timesteps, text).sample


@contextlib.contextmanager
def blocks_kept(transformer, kept):
    """Run a teacher expert with only the `kept` blocks (the others skipped), restoring it afterwards."""
    blocks = transformer.blocks
    transformer.blocks = nn.ModuleList([blocks[i] for i in kept])
    try:
        yield
    finally:
        transformer.blocks = blocks


# --- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role, timesteps", [("high_noise", [900.0, 990.0]), ("low_noise", [50.0, 600.0])])
def test_full_projection_reproduces_each_a14b_expert(a14b, role, timesteps):
    student, report = project(a14b, full_size(a14b), expert=role)
    assert report.experts == [a14b.expert_for_role(role)]
    assert all(a14b.expert_for_timestep(t) == report.experts[0] for t in timesteps)  # velocity routes to it
    latents, t, text = latents_and_text(a14b, timesteps)
    err = (student_velocity(student, latents, t, text) - a14b.velocity(latents, t, text)[:, :, 0]).abs().max().item()
    print(f"a14b {role}: max |student - teacher| = {err:.2e}")
    assert err <= 1e-5
    assert set(r.kind for r in report.records) == {"copied"}


def test_full_projection_reproduces_ti2v_5b_with_per_token_timesteps(ti2v):
    assert ti2v.expand_timesteps and ti2v.latent_channels == 48
    student, _ = project(ti2v, full_size(ti2v))
    latents, t, text = latents_and_text(ti2v, [100.0, 700.0])
    err = (student_velocity(student, latents, t, text, per_token=True)
           - ti2v.velocity(latents, t, text)[:, :, 0]).abs().max().item()
    print(f"ti2v-5b: max |student - teacher| = {err:.2e}")
    assert err <= 1e-5


def test_temporal_patch_kernel_is_summed_exactly_for_a_static_image():
    """A teacher with a temporal patch of 2 on a static 2-frame clip = the student on the image."""
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**{**tiny_transformer_config(), "patch_size": (2, 2, 2)}).eval()
    student, report = project(teacher, {"hidden_size": 32, "depth": 4, "num_heads": 2, "ffn_dim": 64})
    image, t, text = torch.randn(2, 16, 8, 8), torch.tensor([300.0, 700.0]), torch.randn(2, 512, 32)
    with torch.no_grad():
        clip_velocity = teacher(image[:, :, None].expand(-1, -1, 2, -1, -1), t, text).sample
        err = (student(image, t, text).sample - clip_velocity.mean(2)).abs().max().item()
    assert err <= 1e-5
    kinds = {r.name: r.kind for r in report.records}
    assert kinds["patch_embedding.weight"] == kinds["proj_out.weight"] == "projected"


def test_depth_only_projection_equals_teacher_with_blocks_skipped(a14b):
    expert = a14b.load_expert(a14b.expert_for_role("low_noise"))
    latents, t, text = latents_and_text(a14b, [200.0, 700.0], seed=1)
    for layers in ([0, 2], "first_last", "uniform", [3]):
        config = {**full_size(a14b), "depth": 2 if layers != [3] else 1}
        student, report = project(a14b, config, layers=layers)
        with blocks_kept(expert, report.depth_map):
            reference = a14b.velocity(latents, t, text)[:, :, 0]
        err = (student_velocity(student, latents, t, text) - reference).abs().max().item()
        print(f"layers={layers!r} -> teacher blocks {report.depth_map}: max err {err:.2e}")
        assert err <= 1e-5
    full = a14b.velocity(latents, t, text)[:, :, 0]
    assert (student_velocity(student, latents, t, text) - full).abs().max() > 1e-3  # skipping blocks matters


def test_expert_mean_averages_the_two_experts(a14b):
    student, report = project(a14b, full_size(a14b), expert="mean")
    high, low = (a14b.load_expert(n) for n in ("transformer", "transformer_2"))
    name = "blocks.1.ffn.net.0.proj.weight"
    expected = (high.get_parameter(name) + low.get_parameter(name)) / 2
    assert torch.allclose(student.get_parameter(name), expected, atol=1e-7)
    assert report.experts == ["transformer", "transformer_2"]
    assert all(r.kind == "projected" and r.source.startswith("mean(") for r in report.records)


def test_bfloat16_teacher_gives_a_float32_student():
    teacher = load_teacher(tiny_wan_path("a14b"), dtype="bfloat16")
    student, report = project(teacher, CONFIG_DIR / "student_config_small.json", expert="mean", layers="importance")
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in student.parameters())
    assert report.experts == ["transformer", "transformer_2"] and report.importance is not None


# --- reduced width ------------------------------------------------------------------------------------------


def test_importance_width_starts_closer_to_the_teacher_than_truncate_and_random(a14b):
    """Relative velocity-matching MSE at initialisation, averaged over seeds of latents, prompts and timesteps
    (held out from calibration: other latents and other prompts)."""
    config = json.loads((CONFIG_DIR / "student_config_small.json").read_text())

    def error(student, seed):
        g = torch.Generator().manual_seed(100 + seed)
        latents = torch.randn(4, 16, 1, 16, 16, generator=g)
        t = torch.rand(4, generator=g) * 800 + 20  # low-noise expert's range (< 875)
        _, _, text = latents_and_text(a14b, [0.0] * 4, seed=seed)
        teacher = a14b.velocity(latents, t, text)[:, :, 0]
        return ((student_velocity(student, latents, t, text) - teacher).square().mean() / teacher.square().mean()).item()

    seeds = range(4)
    errors = {}
    for width in ("importance", "truncate", "svd"):
        student, _ = project(a14b, config, width=width)
        errors[width] = sum(error(student, s) for s in seeds) / len(seeds)
    random = [WanLiteTransformer2DModel.from_student_config(config, a14b.transformer_config(), seed=i) for i in range(3)]
    errors["random"] = sum(error(m, s) for m in random for s in seeds) / (len(seeds) * len(random))
    print("initial relative velocity MSE vs teacher:", {k: round(v, 4) for k, v in errors.items()})
    assert errors["importance"] < errors["truncate"]
    assert errors["importance"] < errors["random"]


def test_width_reduced_report_and_importance_scores(a14b):
    config = {"hidden_size": 16, "depth": 2, "num_heads": 1, "ffn_dim": 32}
    student, report = project(a14b, config, layers="importance", calibration={"num_samples": 4, "seed": 3})
    imp, layers = report.importance, a14b.transformer_config()["num_layers"]
    assert imp.block_influence.shape == (layers,) and imp.self_heads.shape == imp.cross_heads.shape == (layers, 2)
    assert imp.ffn_neurons.shape == (layers, 64) and imp.channels.shape == (32,)
    assert report.depth_map == sorted(imp.block_influence.topk(2).indices.tolist())
    assert report.channels == sorted(imp.channels.topk(16).indices.tolist())
    kinds = {r.name: r for r in report.records}
    assert kinds["blocks.0.ffn.net.0.proj.weight"].kind == "selected"
    assert kinds["blocks.0.ffn.net.2.bias"].kind == "projected"  # carries the removed neurons' mean output
    assert all(0 < r.energy_kept <= 1 for r in report.records if r.kind == "selected")
    text = str(report)
    assert "blocks.1.attn2.to_k.weight" in text and "depth map" in text
    assert "<table>" in report._repr_html_()
    assert json.loads(json.dumps(report.to_dict()))["depth_map"] == report.depth_map
    assert student_model_config(config, a14b.transformer_config())["ffn_dim"] == student.config.ffn_dim


def test_calibration_can_be_given_explicitly(a14b):
    calibration = make_calibration(a14b, ["a red car", "a blue house"], num_samples=2, latent_size=8, seed=1)
    assert calibration.latents.shape == (2, 16, 1, 8, 8) and (calibration.timesteps < 875).all()
    explicit = Calibration(calibration.latents[:, :, 0], calibration.timesteps, calibration.prompt_embeds)
    expert = a14b.load_expert("transformer_2")
    first, second = measure_importance(expert, calibration), measure_importance(expert, explicit)
    torch.testing.assert_close(first.channels, second.channels)
    high = make_calibration(a14b, expert="high_noise", num_samples=3)
    assert (high.timesteps >= 875).all()


def test_impossible_requests_are_clear_errors(a14b):
    with pytest.raises(ValueError, match="contradicts the teacher"):
        project(a14b, {"hidden_size": 16, "depth": 2, "num_heads": 1, "num_channels": 4})
    with pytest.raises(ValueError, match="head dim"):
        project(a14b, {"hidden_size": 16, "depth": 2, "num_heads": 2})  # 8-dim heads cannot be whole teacher heads
    with pytest.raises(ValueError, match="exceeds"):
        project(a14b, {"hidden_size": 64, "depth": 2, "num_heads": 4})
    with pytest.raises(ValueError, match="depth"):
        project(a14b, {"hidden_size": 32, "depth": 9, "num_heads": 2})
    with pytest.raises(ValueError, match="layers"):
        project(a14b, {"hidden_size": 32, "depth": 2, "num_heads": 2}, layers=[0, 7])


def test_select_layers():
    assert select_layers(40, 16) == [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]
    assert select_layers(40, 4, "first_last") == [0, 1, 38, 39]
    assert select_layers(4, 3, "first_last") == [0, 1, 3]
    assert select_layers(4, 2, [3, 1]) == [3, 1]
    assert select_layers(4, 4) == [0, 1, 2, 3]


# --- full scale on the meta device ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", ["importance", "truncate", "svd"])
def test_meta_plan_a14b_expert_to_default_student(width):
    with torch.device("meta"):
        teacher = WanTransformer3DModel(**A14B_EXPERT)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    assert teacher_params == 14_288_491_584
    student, report = project(teacher, CONFIG_DIR / "student_config.json", width=width)
    assert isinstance(report, ProjectionReport) and report.plan_only
    assert all(p.is_meta for p in student.parameters())
    teacher_shapes = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    student_shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    assert [r.name for r in report.records] == list(student_shapes)
    for r in report.records:
        assert r.shape == student_shapes[r.name] and r.source_shape == teacher_shapes[r.source], r.name
    assert len(report.depth_map) == 16 == student.config.num_layers and student.config.attention_head_dim == 128
    assert report.student_parameters == sum(math.prod(shape) for shape in student_shapes.values())
    print(f"A14B expert {teacher_params:,} -> default student {report.student_parameters:,} parameters "
          f"({report.student_parameters / teacher_params:.2%})")


def test_projection_computes_and_leaves_drawing_to_viz():
    # Training imports projection; the report's text and HTML (and every figure) come from viz, on demand.
    import subprocess
    import sys

    code = "import sys, wandistiller.projection; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
