import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.models.autoencoders.autoencoder_kl_wan import AvgDown3D, DupUp3D
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.pipeline import WanLitePipeline, export_pipeline
from wandistiller.projection import project
from wandistiller.teacher import load_teacher
from wandistiller.vae2d import WanVAE2D

PROMPT = "a red fox sitting in fresh snow"
STEPS = 4


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _small_student(teacher, seed=0):
    config = {"hidden_size": 32, "depth": 1, "num_heads": 2}
    return WanLiteTransformer2DModel.from_student_config(config, teacher.pipe.transformer, seed=seed).eval()


def _full_size_student(teacher, expert="high_noise"):
    """The teacher's expert projected at its full width and depth: exact (invariant 1), so any difference
    between the student's and the teacher's samples comes from the pipeline."""
    config = teacher.pipe.transformer.config
    size = {"hidden_size": config.num_attention_heads * config.attention_head_dim, "depth": config.num_layers,
            "num_heads": config.num_attention_heads}
    # Full width keeps every channel, so no calibration is needed: "truncate" skips it.
    student, _ = project(teacher, size, expert=expert, width="truncate")
    return student


def _export_and_move(tmp_path, teacher, student, **kwargs):
    """Export, then move the folder: a pipeline that still pointed at where it was written (or at the teacher's
    files through a relative path) would break here."""
    written = export_pipeline(tmp_path / "run" / "pipeline", student, teacher.source, **kwargs)
    moved = tmp_path / "elsewhere" / "my-wan-lite"
    moved.parent.mkdir()
    shutil.move(written, moved)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary folder left behind
    return _quiet(WanLitePipeline.from_pretrained(moved))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small_pipe(tiny_teacher):
    return _quiet(WanLitePipeline.from_teacher(tiny_teacher, _small_student(tiny_teacher)))


@pytest.fixture(scope="module")
def teacher_21(wandistiller_home):
    return load_teacher("tiny-2.1", device_strategy="cpu")


def test_image_from_prompt_and_from_prompt_embeds(small_pipe, tiny_teacher):
    image = small_pipe(PROMPT, height=32, width=48, num_inference_steps=2, generator=_gen()).images
    assert len(image) == 1 and image[0].size == (48, 32)
    assert small_pipe(PROMPT, num_inference_steps=1).images[0].size == (64, 64)  # the default size

    from_text = small_pipe([PROMPT, "a cat"], num_inference_steps=2, generator=_gen(), output_type="np").images
    embeds = tiny_teacher.encode_prompts([PROMPT, "a cat"])
    from_embeds = small_pipe(prompt_embeds=embeds, num_inference_steps=2, generator=_gen(), output_type="np").images
    assert from_text.shape == (2, 64, 64, 3)
    assert (from_text == from_embeds).all()  # the pipeline encodes prompts exactly as the teacher does


def test_output_types_and_explicit_noise(small_pipe, tiny_teacher):
    embeds = tiny_teacher.encode_prompts([PROMPT])
    noise = torch.randn(tiny_teacher.latent_shape(1, 32, 32), generator=_gen())  # the teacher's (B, C, 1, h, w)
    run = dict(prompt_embeds=embeds, num_inference_steps=2)
    latent = small_pipe(**run, latents=noise, output_type="latent").images
    assert latent.shape == (1, 16, 4, 4)
    assert torch.equal(small_pipe(**run, latents=noise.squeeze(2), output_type="latent").images, latent)
    pt = small_pipe(**run, latents=noise, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    np_image = small_pipe(**run, latents=noise, output_type="np", return_dict=False)[0]
    assert np_image.shape == (1, 32, 32, 3)
    assert torch.equal(torch.from_numpy(np_image).permute(0, 3, 1, 2), pt)
    with pytest.raises(ValueError, match="latents have shape"):
        small_pipe(**run, latents=noise, height=64, width=64)


def test_one_forward_per_step_without_guidance(small_pipe, tiny_teacher):
    calls = []
    hook = small_pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = small_pipe(PROMPT, num_inference_steps=3, generator=_gen(), output_type="latent").images
        assert len(calls) == 3
        guided = small_pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, generator=_gen(),
                            output_type="latent").images
        assert len(calls) == 3 + 6
    finally:
        hook.remove()
    assert not torch.equal(plain, guided)


def test_save_load_round_trip_is_bit_exact(small_pipe, tmp_path):
    small_pipe.save_pretrained(tmp_path)
    loaded = _quiet(WanLitePipeline.from_pretrained(tmp_path))
    assert isinstance(loaded.transformer, WanLiteTransformer2DModel)
    assert type(loaded.scheduler) is type(small_pipe.scheduler)
    before = small_pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=_gen(3), output_type="np")
    after = loaded(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=_gen(3), output_type="np")
    assert (before.images == after.images).all()


def test_released_text_encoder_needs_prompt_embeds(tmp_path, wandistiller_home):
    teacher = load_teacher("tiny-2.1", device_strategy="cpu")
    embeds, negative = teacher.encode_prompts([PROMPT], negative="")
    teacher.release_text_encoder()
    pipe = _quiet(WanLitePipeline.from_teacher(teacher, _small_student(teacher)))
    assert pipe.text_encoder is None
    with pytest.raises(ValueError, match="no text encoder.*prompt_embeds"):
        pipe(PROMPT)
    with pytest.raises(ValueError, match="no text encoder.*negative"):
        pipe(prompt_embeds=embeds, guidance_scale=2.0)
    image = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=2.0, num_inference_steps=1,
                 generator=_gen(), output_type="np").images
    pipe.save_pretrained(tmp_path)  # a text-encoder-free pipeline round-trips too
    loaded = _quiet(WanLitePipeline.from_pretrained(tmp_path))
    assert loaded.text_encoder is None
    again = loaded(prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=2.0, num_inference_steps=1,
                   generator=_gen(), output_type="np").images
    assert (image == again).all()


def test_bad_inputs_raise_clear_errors(small_pipe):
    with pytest.raises(ValueError, match="multiples of 16x16"):
        small_pipe(PROMPT, height=40, width=64)
    with pytest.raises(ValueError, match="exactly one of `prompt` and `prompt_embeds`"):
        small_pipe()
    with pytest.raises(ValueError, match="output_type"):
        small_pipe(PROMPT, output_type="video")


def test_student_and_vae_must_agree(small_pipe, tiny_ti2v_teacher):
    with pytest.raises(ValueError, match="16 latent channels but the VAE makes 48"):
        WanLitePipeline.from_teacher(tiny_ti2v_teacher, small_pipe.transformer)


def _teacher_sample(wan, prompt, height, guidance, output_type, scheduler=None):
    if scheduler is not None:  # the same modules under another scheduler, leaving the teacher untouched
        wan = WanPipeline(**{**wan.components, "scheduler": scheduler}, expand_timesteps=wan.config.expand_timesteps)
    _quiet(wan)
    out = wan(prompt, height=height, width=height, num_frames=1, num_inference_steps=STEPS, guidance_scale=guidance,
              generator=_gen(7), output_type=output_type).frames
    return out[:, :, 0] if output_type == "latent" else out[:, 0]


@pytest.mark.parametrize("scheduler", ["teacher", "flow_match_euler"])
def test_full_size_student_samples_the_teachers_image(teacher_21, scheduler):
    """End to end: same noise, scheduler and guidance -> WanPipeline's latents and pixels (Wan 2.1: one expert)."""
    scheduler = None if scheduler == "teacher" else FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = _quiet(WanLitePipeline.from_teacher(teacher_21, _full_size_student(teacher_21), scheduler=scheduler))
    g = teacher_21.guidance_scale
    expected = _teacher_sample(teacher_21.pipe, PROMPT, 64, g, "latent", scheduler)
    latents = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=g, generator=_gen(7), output_type="latent").images
    assert (latents - expected).abs().max() < 1e-4
    if scheduler is None:
        expected = _teacher_sample(teacher_21.pipe, PROMPT, 64, g, "np")
        images = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=g, generator=_gen(7), output_type="np").images
        assert abs(images - expected).max() < 1e-4


def test_full_size_ti2v_student_with_per_token_timesteps(tiny_ti2v_teacher):
    pipe = _quiet(WanLitePipeline.from_teacher(tiny_ti2v_teacher, _full_size_student(tiny_ti2v_teacher)))
    assert pipe.config.expand_timesteps and pipe.size_multiple == (32, 32)
    g = tiny_ti2v_teacher.guidance_scale
    expected = _teacher_sample(tiny_ti2v_teacher.pipe, PROMPT, 64, g, "latent")
    latents = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=g, generator=_gen(7), output_type="latent").images
    assert latents.shape == (1, 48, 4, 4)
    assert (latents - expected).abs().max() < 1e-4


# --- the exported, self-contained pipeline -------------------------------------------------------------------

# Every torch module type that works on a time axis; Wan's causal conv is a Conv3d subclass.
MODULES_3D = (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d,
              nn.BatchNorm3d, nn.InstanceNorm3d, AvgDown3D, DupUp3D)
CONVOLUTIONS = {torch.ops.aten.convolution.default, torch.ops.aten.conv3d.default}


class _ConvolutionRanks(TorchDispatchMode):
    """Records the rank of every convolution's input that actually runs (a functional conv3d included)."""

    def __init__(self):
        super().__init__()
        self.ranks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS:
            self.ranks.append(args[0].ndim)
        return func(*args, **(kwargs or {}))


def test_exported_pipeline_is_self_contained_and_purely_2d(teacher_21, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    student = _small_student(teacher_21)
    loaded = _export_and_move(tmp_path, teacher_21, student, cfg_distilled=True, teacher_guidance_scale=5.0)
    assert isinstance(loaded.vae, WanVAE2D) and loaded.tokenizer is not None and loaded.text_encoder is not None
    components = [m for m in loaded.components.values() if isinstance(m, nn.Module)]
    assert len(components) == 3  # transformer, VAE, text encoder
    found_3d = [type(m).__name__ for c in components for m in c.modules() if isinstance(m, MODULES_3D)]
    assert found_3d == []
    assert loaded.config.cfg_distilled and loaded.default_guidance_scale() == 1.0

    calls, spy = [], _ConvolutionRanks()
    hook = loaded.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        with spy:
            image = loaded(PROMPT, num_inference_steps=2, generator=_gen(5), output_type="np").images
    finally:
        hook.remove()
    assert len(calls) == 2  # CFG-distilled: one forward per step
    assert spy.ranks and set(spy.ranks) == {4}  # the patch embedding and every VAE conv ran, all on images
    # The same student with the teacher's own 3D VAE, in memory: the export changed nothing but the VAE's form.
    reference = _quiet(WanLitePipeline.from_teacher(teacher_21, student))
    expected = reference(PROMPT, num_inference_steps=2, generator=_gen(5), output_type="np").images
    assert abs(image - expected).max() < 1e-5  # the 2D VAE's tolerance (reduction order only)


def test_export_never_replaces_a_pipeline_silently(teacher_21, tmp_path):
    folder = tmp_path / "pipeline"
    export_pipeline(folder, _small_student(teacher_21, seed=0), teacher_21.source, cfg_distilled=True)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_pipeline(folder, _small_student(teacher_21, seed=1), teacher_21.source, cfg_distilled=True)
    assert weights.read_bytes() == before
    export_pipeline(folder, _small_student(teacher_21, seed=1), teacher_21.source, cfg_distilled=False,
                    teacher_guidance_scale=3.0, overwrite=True)
    assert weights.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_a_student_trained_without_guided_targets_samples_with_the_teachers_guidance(small_pipe, tmp_path):
    pipe = WanLitePipeline(**small_pipe.components, cfg_distilled=False, teacher_guidance_scale=4.0)
    pipe.save_pretrained(tmp_path)
    loaded = _quiet(WanLitePipeline.from_pretrained(tmp_path))
    assert loaded.default_guidance_scale() == 4.0
    calls = []
    hook = loaded.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        default = loaded(PROMPT, num_inference_steps=2, generator=_gen(), output_type="latent").images
    finally:
        hook.remove()
    assert len(calls) == 4  # two forwards per step: conditional and unconditional
    guided = loaded(PROMPT, num_inference_steps=2, guidance_scale=4.0, generator=_gen(), output_type="latent").images
    assert torch.equal(default, guided)


@pytest.mark.parametrize("folder, message", [
    ("missing", "does not exist"),
    ("empty", "not a Wan-Lite pipeline \\(no model_index.json\\)"),
    ("teacher", "holds a WanPipeline, not a Wan-Lite pipeline"),
    ("incomplete", "incomplete Wan-Lite pipeline \\(no vae folder\\)"),
])
def test_loading_what_is_not_a_wan_lite_pipeline_is_a_one_line_error(small_pipe, teacher_21, tmp_path, folder,
                                                                      message):
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    elif folder == "teacher":
        path = teacher_21.source
    elif folder == "incomplete":
        small_pipe.save_pretrained(path)
        shutil.rmtree(path / "vae")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        WanLitePipeline.from_pretrained(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("teacher_name", ["tiny-2.1", "tiny-ti2v-5b"])
def test_exported_full_size_student_samples_the_teachers_image(teacher_name, tmp_path, wandistiller_home):
    """Issue 12: projected at full size from a single-expert teacher, exported (2D VAE), moved and loaded, the
    student samples WanPipeline's num_frames=1 image from the same seed, steps and (the teacher's) guidance."""
    teacher = load_teacher(teacher_name, device_strategy="cpu")
    g = teacher.guidance_scale
    loaded = _export_and_move(tmp_path, teacher, _full_size_student(teacher), cfg_distilled=False,
                              teacher_guidance_scale=g)
    assert isinstance(loaded.vae, WanVAE2D)
    expected = _teacher_sample(teacher.pipe, PROMPT, 64, g, "np")
    images = loaded(PROMPT, num_inference_steps=STEPS, generator=_gen(7), output_type="np").images
    assert images.shape == expected.shape == (1, 64, 64, 3)
    assert abs(images - expected).max() < 1e-5  # reduction order only: measured 0.9e-6 (2.1), 1.4e-6 (TI2V)


def test_a14b_student_from_one_expert_is_exact_where_that_expert_serves(tiny_teacher):
    """A14B switches experts at t = boundary_ratio x 1000: a student projected from one expert samples WanPipeline's
    image when that expert (with its guidance) serves every step, and not the two-expert image."""
    wan = tiny_teacher.pipe
    pipe = _quiet(WanLitePipeline.from_teacher(tiny_teacher, _full_size_student(tiny_teacher, "low_noise")))
    g2 = tiny_teacher.guidance_scale_2
    one_expert = WanPipeline(**{**wan.components, "transformer": wan.transformer_2},
                             boundary_ratio=wan.config.boundary_ratio)
    expected = _teacher_sample(one_expert, PROMPT, 64, g2, "latent")
    latents = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=g2, generator=_gen(7), output_type="latent").images
    assert (latents - expected).abs().max() < 1e-5  # reduction order only: measured 2.6e-6
    _quiet(wan)
    two_experts = wan(PROMPT, height=64, width=64, num_frames=1, num_inference_steps=STEPS, guidance_scale=g2,
                      guidance_scale_2=g2, generator=_gen(7), output_type="latent").frames[:, :, 0]
    assert (latents - two_experts).abs().max() > 0.1  # t=999 (>= 875) belongs to the other expert: measured 0.40
