import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.pipeline import WanLitePipeline
from wandistiller.projection import project
from wandistiller.teacher import load_teacher

PROMPT = "a red fox sitting in fresh snow"
STEPS = 4


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _small_student(teacher, seed=0):
    config = {"hidden_size": 32, "depth": 1, "num_heads": 2}
    return WanLiteTransformer2DModel.from_student_config(config, teacher.pipe.transformer, seed=seed).eval()


def _full_size_student(teacher):
    """The teacher's expert projected at its full width and depth: exact (invariant 1), so any difference
    between the student's and the teacher's samples comes from the pipeline."""
    config = teacher.pipe.transformer.config
    size = {"hidden_size": config.num_attention_heads * config.attention_head_dim, "depth": config.num_layers,
            "num_heads": config.num_attention_heads}
    # Full width keeps every channel, so no calibration is needed: "truncate" skips it.
    student, _ = project(teacher, size, expert="high_noise", width="truncate")
    return student


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
