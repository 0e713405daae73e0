"""Relations that hold bit for bit, asserted with atol=0: a full-size projected student is its teacher expert,
renoised inputs are built on the teacher's own samples, and notebook 04 samples teacher and student from one noise.
"""

import numpy as np
import pytest
import torch

from wandistiller.data import TargetSpec, _prompt_noise, make_inputs, record_trajectories
from wandistiller.flow import add_noise
from wandistiller.projection import project
from wandistiller.teacher import load_teacher

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast"]


def full_size(teacher) -> dict:
    config = teacher.transformer_config()
    return {"hidden_size": config["num_attention_heads"] * config["attention_head_dim"],
            "depth": config["num_layers"], "num_heads": config["num_attention_heads"], "ffn_dim": config["ffn_dim"]}


def test_a_full_size_projection_is_its_teacher_expert_bit_for_bit(tiny_teacher):
    student, _ = project(tiny_teacher, full_size(tiny_teacher), width="truncate", expert="high_noise")
    expert = tiny_teacher.load_expert("transformer")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 1, 8, 8, generator=generator)
    text = torch.randn(2, 512, 32, generator=generator)
    t = torch.tensor([900.0, 980.0])
    with torch.no_grad():
        torch.testing.assert_close(student(latents[:, :, 0], t, text).sample, expert(latents, t, text).sample[:, :, 0],
                                   rtol=0, atol=0)
    hidden = torch.randn(2, 16, student.config.num_attention_heads * student.config.attention_head_dim,
                         generator=generator)
    torch.testing.assert_close(student.norm_out(hidden), expert.norm_out(hidden), rtol=0, atol=0)


def test_renoised_inputs_lie_between_noise_and_the_teachers_own_sample():
    teacher = load_teacher("tiny", device_strategy="cpu")
    spec = TargetSpec(latent_source="renoise", samples_per_prompt=2, num_inference_steps=3)
    embeds, negative = teacher.encode_prompts(PROMPTS[:1], negative="")
    inputs = make_inputs(teacher, spec, [0], embeds, negative, progress=False)
    noise = _prompt_noise(teacher, spec, 0)
    _, sample = record_trajectories(teacher, embeds, negative, noise, spec, progress=False)
    eps = torch.cat([_prompt_noise(teacher, spec, 0, s) for s in (1, 2)])[:, :, 0]
    x0 = sample[:, :, 0].expand(2, -1, -1, -1)
    torch.testing.assert_close(inputs["latents"], add_noise(x0, eps, inputs["timesteps"]), rtol=0, atol=0)
    # the sample is the pipeline's own image latent for that noise (tolerance: another batching of the same sums)
    teacher.load_all_experts()  # both resident for the pipeline call
    reference = teacher.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, num_frames=1,
                             height=64, width=64, num_inference_steps=3, guidance_scale=teacher.guidance_scale,
                             guidance_scale_2=teacher.guidance_scale_2, output_type="latent").frames
    torch.testing.assert_close(sample, reference, rtol=0, atol=1e-4)


def test_notebook_04_draws_teacher_and_student_from_the_same_noise():
    from wandistiller.evaluate import teacher_and_student_images
    from wandistiller.pipeline import WanLitePipeline

    teacher = load_teacher("tiny-2.1", device_strategy="cpu")  # one expert, so a full-size student is exact
    student, _ = project(teacher, full_size(teacher), width="truncate")
    pipe = WanLitePipeline.from_teacher(teacher, student, cfg_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    teacher.pipe.set_progress_bar_config(disable=True)
    images = teacher_and_student_images(teacher, pipe, PROMPTS, height=64, width=64, num_inference_steps=3)
    for drawn_by_teacher, drawn_by_student in zip(images["teacher"], images["student"]):
        difference = np.abs(np.asarray(drawn_by_teacher, dtype=int) - np.asarray(drawn_by_student, dtype=int))
        assert difference.max() <= 1, f"largest pixel difference {difference.max()}"  # rounding to 8 bits only
