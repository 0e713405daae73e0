import dataclasses

import pytest
import torch
from PIL import Image

from wandistiller.data import TargetSpec, compute_targets, read_prompts, record_trajectories
from wandistiller.teacher import load_teacher

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen"]


@pytest.fixture()
def lazy_teacher(tmp_path):
    return load_teacher("tiny", device_strategy="cpu", load_experts=False, cache_dir=tmp_path / "embeds")


def test_shipped_prompts_are_many_and_diverse():
    prompts = read_prompts()
    assert len(prompts) >= 55 and len(set(prompts)) == len(prompts)


def test_prompt_file_errors(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("# a comment\n\na cat\n  a dog  \n", encoding="utf-8")
    assert read_prompts(good) == ["a cat", "a dog"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_trajectory_records_are_teacher_velocities_one_expert_at_a_time(lazy_teacher):
    teacher = lazy_teacher
    spec = TargetSpec(num_inference_steps=6)
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    noise = torch.randn(teacher.latent_shape(3, 64, 64), generator=torch.Generator().manual_seed(0))
    resident_at_call = []
    real = teacher.expert_velocity

    def spy(name, *args):  # records what is resident at each real expert call, then makes it
        resident_at_call.append((name, tuple(teacher.resident_experts())))
        return real(name, *args)

    teacher.expert_velocity = spy
    records, final = record_trajectories(teacher, embeds, negative, noise, spec, batch_size=2, progress=False)
    del teacher.expert_velocity
    assert all(resident == (name,) for name, resident in resident_at_call)
    order = [name for name, _ in resident_at_call]
    assert order == sorted(order), "all high-noise steps must come before the low-noise ones"
    assert len(records["timesteps"]) == 3 * 6

    # every record is the teacher's velocity at the recorded (x_t, t)
    for i in range(0, len(records["timesteps"]), 5):
        x = records["latents"][i:i + 1, :, None]
        t = records["timesteps"][i:i + 1]
        p = records["prompt_index"][i:i + 1]
        torch.testing.assert_close(teacher.velocity(x, t, embeds[p])[:, :, 0], records["v_cond"][i:i + 1],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(teacher.velocity(x, t, negative[p])[:, :, 0], records["v_uncond"][i:i + 1],
                                   rtol=0, atol=1e-5)
        expected_g = teacher.guidance_for_expert(teacher.expert_for_timestep(t))
        assert records["guidance"][i] == expected_g

    # and the trajectory is the one WanPipeline itself samples from the same noise
    teacher.load_all_experts()  # both resident for the reference pipeline call
    reference = teacher.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, num_frames=1,
                             height=64, width=64, num_inference_steps=6, guidance_scale=teacher.guidance_scale,
                             guidance_scale_2=teacher.guidance_scale_2, output_type="latent").frames
    torch.testing.assert_close(final, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("source", ["noise", "renoise", "images"])
def test_random_timestep_sources(lazy_teacher, tmp_path, source):
    images = tmp_path / "imgs"
    images.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (80, 72), colour).save(images / f"{i}.png")
    spec = TargetSpec(latent_source=source, samples_per_prompt=3, num_inference_steps=4, images_path=str(images),
                      velocity="both")
    embeds, negative = lazy_teacher.encode_prompts(PROMPTS, negative="")
    targets = compute_targets(lazy_teacher, spec, [0, 2], embeds[[0, 2]], negative[:1], progress=False)
    assert targets["latents"].shape == (6, 16, 8, 8)
    assert targets["prompt_index"].tolist() == [0, 0, 0, 2, 2, 2]
    t = targets["timesteps"]
    assert ((t >= 0) & (t < 1000)).all() and len(set(t.tolist())) == 6
    v = lazy_teacher.velocity(targets["latents"][:1, :, None], t[:1], embeds[:1])[:, :, 0]
    torch.testing.assert_close(v, targets["v_cond"][:1], rtol=0, atol=1e-5)


def test_trajectories_without_cfg_are_the_pipelines(lazy_teacher):
    # guidance_scale <= 1: WanPipeline makes no unconditional pass (whatever guidance_scale_2 says); nor do we
    teacher = dataclasses.replace(lazy_teacher, guidance_scale=0.5, guidance_scale_2=0.5)
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    noise = torch.randn(teacher.latent_shape(3, 64, 64), generator=torch.Generator().manual_seed(0))
    records, final = record_trajectories(teacher, embeds, negative, noise, TargetSpec(num_inference_steps=4),
                                         progress=False)
    assert torch.equal(records["v_uncond"], records["v_cond"]) and (records["guidance"] == 1).all()
    teacher.load_all_experts()  # both resident for the reference pipeline call
    reference = teacher.pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, num_frames=1,
                             height=64, width=64, num_inference_steps=4, guidance_scale=0.5, guidance_scale_2=0.5,
                             output_type="latent").frames
    torch.testing.assert_close(final, reference, rtol=0, atol=0)


def test_several_trajectories_per_prompt(lazy_teacher):
    embeds, negative = lazy_teacher.encode_prompts(PROMPTS, negative="")
    one = compute_targets(lazy_teacher, TargetSpec(num_inference_steps=4, velocity="both"), [0, 2], embeds[[0, 2]],
                          negative[:1], progress=False)
    two = compute_targets(lazy_teacher, TargetSpec(num_inference_steps=4, trajectories_per_prompt=2, velocity="both"),
                          [0, 2], embeds[[0, 2]], negative[:1], progress=False)
    assert len(two["timesteps"]) == 2 * 2 * 4 and sorted(two["prompt_index"].tolist()) == [0] * 8 + [2] * 8
    # each prompt's first trajectory is the one a single trajectory per prompt records (its noise sample 0)
    for p in (0, 2):
        starts = two["latents"][(two["prompt_index"] == p) & (two["timesteps"] == two["timesteps"].max())]
        first = one["latents"][(one["prompt_index"] == p) & (one["timesteps"] == one["timesteps"].max())]
        assert len(starts) == 2 and torch.equal(starts[0], first[0]) and not torch.equal(starts[0], starts[1])
    # every record carries its own prompt's velocity
    for i in (0, 5, 11):
        x, t, p = two["latents"][i:i + 1, :, None], two["timesteps"][i:i + 1], two["prompt_index"][i:i + 1]
        torch.testing.assert_close(lazy_teacher.velocity(x, t, embeds[p])[:, :, 0], two["v_cond"][i:i + 1],
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="applies to latent_source='trajectory' only"):
        TargetSpec(latent_source="noise", trajectories_per_prompt=2)
