"""Analysis helpers of notebooks 01/02: tables that say what is 3D, the expert schedule WanPipeline really
follows, attention weights that reproduce SDPA, and initial errors that separate exact from random."""

import pytest
import torch
from matplotlib.figure import Figure

from wandistiller import analysis as wi
from wandistiller import viz
from wandistiller.data import read_prompts
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.projection import make_calibration, project

SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1, "ffn_dim": 32}


@pytest.fixture(scope="module")
def calibration(tiny_teacher):
    return make_calibration(tiny_teacher, read_prompts()[:3], expert="low_noise", num_samples=3, latent_size=8)


@pytest.fixture(scope="module")
def low_noise(tiny_teacher):
    return tiny_teacher.load_expert("transformer_2")


@pytest.fixture(scope="module")
def full_student(tiny_teacher):
    return project(tiny_teacher, wi.full_size_student_config(tiny_teacher.transformer_config()))[0]


# --- structure ---------------------------------------------------------------------------------------------


def test_module_table_marks_the_temporal_parts_of_a_wan_expert(low_noise):
    table = wi.module_table(low_noise)
    rows = {r["module"]: r for r in table.to_records()}
    assert {name for name, r in rows.items() if r["temporal axis"] == "yes"} == {"rope", "patch_embedding", "proj_out"}
    assert "kernel (1, 2, 2)" in rows["patch_embedding"]["note"]
    assert "t/h/w 8/4/4" in rows["rope"]["note"]
    assert rows["total"]["parameters"] == sum(p.numel() for p in low_noise.parameters())
    # the first block is expanded, the others are not
    assert "blocks.0.attn1" in rows and "blocks.1" not in rows and "blocks.0.attn1.to_q" not in rows
    assert "blocks.0.attn1.to_q" in {r["module"] for r in wi.module_table(low_noise, ("blocks.0.attn1",)).to_records()}
    assert "patch_embedding" in str(table) and "<table>" in table._repr_html_()


def test_a_student_has_no_temporal_axis(full_student):
    records = wi.module_table(full_student).to_records()
    assert all(r["temporal axis"] in ("no", "") for r in records)
    assert "t*h*w" not in str(wi.module_table(full_student))


def test_full_size_experts_on_the_meta_device():
    a14b, ti2v = wi.meta_expert("a14b"), wi.meta_expert("ti2v-5b")
    assert a14b.patch_embedding.weight.is_meta
    table = wi.architecture_table({"A14B": a14b, "TI2V-5B": ti2v})
    rows = {r[""]: r for r in table.to_records()}
    assert rows["parameters"]["A14B"] == 14_288_491_584 and rows["parameters"]["TI2V-5B"] == 4_999_787_712
    assert rows["parameters per block"]["A14B"] == 351_394_304
    assert rows["RoPE t/h/w dims"]["A14B"] == "44/42/42"
    assert rows["bf16 weights"]["A14B"] == "26.6 GiB"
    a14b_rows = {r["module"]: r for r in wi.module_table(a14b).to_records()}
    assert a14b_rows["total"]["parameters"] == 14_288_491_584
    with pytest.raises(ValueError, match="unknown Wan variant"):
        wi.meta_expert("a28b")


# --- experts over the schedule -----------------------------------------------------------------------------


def test_expert_schedule_is_what_the_pipeline_runs(tiny_teacher):
    steps = 12
    schedule = wi.expert_schedule(tiny_teacher, steps)
    called = []
    hooks = [tiny_teacher.load_expert(name).register_forward_pre_hook(
        lambda m, a, kw, name=name: called.append((name, float(kw["timestep"].flatten()[0]))), with_kwargs=True)
        for name in tiny_teacher.expert_names]
    try:
        embeds, negative = tiny_teacher.encode_prompts(["a red fox"], negative="")
        tiny_teacher.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=1,
                          num_inference_steps=steps, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    # two calls per step (conditional, unconditional)
    assert [(e, t) for e, t in called[::2]] == list(zip(schedule.experts, schedule.timesteps))
    assert schedule.experts[0] == "transformer" and schedule.experts[-1] == "transformer_2"
    assert all((t >= 875) == (e == "transformer") for t, e in zip(schedule.timesteps, schedule.experts))
    assert schedule.guidance[0] == tiny_teacher.guidance_scale and schedule.guidance[-1] == tiny_teacher.guidance_scale_2
    assert "boundary t >= 875" in str(schedule)
    assert len(schedule.table().rows) == steps
    assert isinstance(schedule.plot(), Figure)


# --- what the blocks do ------------------------------------------------------------------------------------


def test_block_statistics_follow_the_residual_stream(low_noise, calibration):
    table = wi.block_statistics(low_noise, calibration)
    assert table.column("block") == list(range(low_noise.config.num_layers))
    rms_in, rms_out = table.column("rms in"), table.column("rms out")
    assert rms_out[:-1] == pytest.approx(rms_in[1:], rel=1e-6)  # block i's output is block i+1's input
    assert all(u > 0 for u in table.column("update / input"))
    assert all(m >= r for m, r in zip(table.column("max |out|"), rms_out))


def _sdpa_and_values(transformer, calibration, block, sample, latents):
    """The attention output (before to_out) and the values of one block, read by hooks in a real forward."""
    attn, seen = transformer.blocks[block].attn1, {}
    hooks = [attn.to_v.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out)),
             attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))]
    with torch.no_grad():
        transformer(latents[sample:sample + 1], calibration.timesteps[sample:sample + 1],
                    calibration.prompt_embeds[sample:sample + 1])
    for h in hooks:
        h.remove()
    return seen["o"][0].unflatten(-1, (attn.heads, -1)), seen["v"][0].unflatten(-1, (attn.heads, -1))


@pytest.mark.parametrize("block, sample", [(0, 0), (3, 2)])
def test_attention_weights_reproduce_the_attention_output(low_noise, calibration, block, sample):
    maps = wi.self_attention_weights(low_noise, calibration, block=block, sample=sample)
    tokens = (calibration.latents.shape[-1] // 2) ** 2
    assert maps.weights.shape == (low_noise.config.num_attention_heads, tokens, tokens)
    assert maps.grid == (4, 4) and maps.timestep == float(calibration.timesteps[sample])
    assert torch.allclose(maps.weights.sum(-1), torch.ones(maps.weights.shape[:2]), atol=1e-5)
    out, v = _sdpa_and_values(low_noise, calibration, block, sample, calibration.latents)
    assert torch.allclose(torch.einsum("hqk,khd->qhd", maps.weights, v), out, atol=1e-5)


def test_full_size_student_attends_like_the_teacher(low_noise, full_student, calibration):
    teacher_maps = wi.self_attention_weights(low_noise, calibration, block=1)
    student_maps = wi.self_attention_weights(full_student, calibration, block=1)  # 2D: frame axis dropped
    assert torch.allclose(student_maps.weights, teacher_maps.weights, atol=1e-5)
    out, v = _sdpa_and_values(full_student, calibration, 1, 0, calibration.latents[:, :, 0])
    assert torch.allclose(torch.einsum("hqk,khd->qhd", student_maps.weights, v), out, atol=1e-5)
    assert isinstance(student_maps.plot(head=1), Figure)


# --- projection views and errors ---------------------------------------------------------------------------


def test_velocity_error_separates_exact_from_narrow_students(tiny_teacher, full_student, calibration):
    assert wi.max_velocity_error(full_student, tiny_teacher, calibration) <= 1e-5
    narrow = project(tiny_teacher, SMALL)[0]
    assert wi.max_velocity_error(narrow, tiny_teacher, calibration) > 1e-2


def test_initial_errors_rank_methods(tiny_teacher):
    exact = wi.initial_errors(tiny_teacher, wi.full_size_student_config(tiny_teacher.transformer_config()),
                              methods=("importance", "random"), seeds=1, random_inits=2)
    assert exact.means()["importance"] < 1e-9 < 0.1 < exact.means()["random"]
    assert len(exact.errors["random"]) == 2  # one per random initialisation and seed
    small = wi.initial_errors(tiny_teacher, SMALL, seeds=2)
    # the projected low-noise expert's whole range, as WanPipeline routes timesteps (see test_flow)
    assert list(small.errors) == list(wi.INIT_METHODS) and small.t_range == (0.0, 875.0)
    means = small.means()
    assert means["importance"] < min(means["truncate"], means["random"])
    text = str(small)
    assert "vs importance" in text and "1.00x" in text
    with pytest.raises(ValueError, match="unknown initialisation method"):
        wi.initial_errors(tiny_teacher, SMALL, methods=("magic",), seeds=1)


def test_held_out_error_on_the_teachers_own_trajectories(tiny_ti2v_teacher):
    teacher = tiny_ti2v_teacher  # one expert: a full-size projection is exact at every step (per-token timesteps)
    held_out = wi.held_out_set(teacher, read_prompts()[-2:], height=64, width=64, num_inference_steps=3, guided=False)
    assert len(held_out.timesteps) == len(held_out.velocity) == 2 * 3 and held_out.per_token  # every step, both prompts
    exact = project(teacher, wi.full_size_student_config(teacher.transformer_config()))[0]
    random = WanLiteTransformer2DModel.from_student_config(SMALL, teacher.transformer_config(), seed=0)
    assert wi.held_out_error(exact, held_out, batch_size=4) < 1e-9 < 0.1 < wi.held_out_error(random, held_out)


def test_projection_figures_show_what_was_kept(tiny_teacher):
    student, report = project(tiny_teacher, SMALL)
    fig = viz.importance_figure(report)
    influence, heads, neurons, channels = fig.axes[:4]
    kept = lambda ax: sum(bar.get_facecolor()[:3] != (0.75, 0.75, 0.75) for bar in ax.patches)
    assert kept(influence) == len(report.depth_map) == 2
    assert kept(heads) == 2 and kept(neurons) == 32 and kept(channels) == 16
    depth = viz.plot_depth_map(report.depth_map, tiny_teacher.transformer_config()["num_layers"])
    assert len(depth.axes[0].lines) == len(report.depth_map)
    weight = tiny_teacher.load_expert("transformer_2").blocks[0].attn1.to_q.weight
    spectra = viz.plot_spectra({"q": weight, "q again": weight}, {"q": 16, "q again": 8})
    assert [ax.get_legend().get_texts()[0].get_text().split(" (")[0] for ax in spectra.axes] == \
        ["kept rank 16", "kept rank 8"]
    _, uniform = project(tiny_teacher, SMALL, width="truncate")
    with pytest.raises(ValueError, match="measured no importance"):
        viz.importance_figure(uniform)
