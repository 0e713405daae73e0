"""The toy world: ground truth the scorer reads back, held-out combinations, and the teacher's training."""

import random

import pytest
import torch

from wandistiller import shapes, text_padding
from wandistiller import toy_world as tw
from wandistiller.alignment import alignment, describe_image, describe_motion, score_image


def _still(shape, colour, background, size=32, x=30.0, y=34.0):
    return shapes.Scene(shape, colour, background, "still", size, x, y)


def test_scorer_reads_every_rendered_combination_exactly():
    scenes = [_still(*combo, size=size) for combo in shapes.all_combinations() for size in shapes.SIZE_RANGE]
    result = alignment([shapes.render(s)[:, 0] for s in scenes], [s.caption for s in scenes])
    assert result.count == 180
    assert (result.background, result.colour, result.shape, result.all_correct) == (1.0, 1.0, 1.0, 1.0)


def test_scorer_reads_random_training_scenes_and_moving_frames():
    clips, captions = shapes.sample_batch(random.Random(3), 48, num_frames=shapes.NUM_FRAMES)
    for frame in range(shapes.NUM_FRAMES):
        assert alignment([c[:, frame] for c in clips], captions).all_correct == 1.0


def test_motion_is_read_from_the_first_and_last_frame():
    clips, captions = shapes.sample_batch(random.Random(4), 60, num_frames=shapes.NUM_FRAMES)
    for clip, caption in zip(clips, captions):
        frames = [clip[:, f] for f in range(shapes.NUM_FRAMES)]
        assert describe_motion(frames) == shapes.parse_caption(caption).motion, caption
        if shapes.parse_caption(caption).motion != "still":  # played backwards it moves the other way
            assert describe_motion(frames[::-1]) != shapes.parse_caption(caption).motion
    blank = torch.full((3, 64, 64), -1.0)
    assert describe_motion([blank, blank]) is None


@pytest.mark.parametrize("wrong, attribute", [
    (dict(shape="circle"), "shape"), (dict(shape="triangle"), "shape"), (dict(colour="yellow"), "colour"),
    (dict(background="white"), "background"),
])
def test_scorer_catches_each_wrong_attribute(wrong, attribute):
    asked = _still("square", "red", "blue")
    drawn = shapes.Scene(**{**asked.__dict__, **wrong})
    scores = score_image(shapes.render(drawn)[:, 0], asked.caption)
    assert scores[attribute] is False and scores["all"] is False
    assert all(scores[a] for a in ("background", "colour", "shape") if a != attribute)


def test_scorer_on_an_empty_picture_and_a_dented_square():
    blank = torch.full((3, 64, 64), -1.0)
    assert describe_image(blank) == {"background": "black", "colour": None, "shape": None}
    square = _still("square", "white", "black")
    image = shapes.render(square)[:, 0].clone()
    image[:, 20:30, 20:30] = -1.0 + 40 / 127.5  # a black bite out of the corner region: not a clean square
    assert describe_image(image)["shape"] != "square"


def test_scorer_accepts_pil_images():
    from PIL import Image

    scene = _still("triangle", "green", "yellow")
    array = ((shapes.render(scene)[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert score_image(Image.fromarray(array), scene.caption)["all"] is True


def test_alignment_table_has_one_row_per_model_with_its_rates():
    from wandistiller.evaluate import alignment_table

    scenes = [_still("square", "red", "blue"), _still("circle", "white", "green"), _still("triangle", "black", "red")]
    prompts = [s.caption for s in scenes]
    right = [shapes.render(s)[:, 0] for s in scenes]
    wrong_shape = [shapes.render(shapes.Scene(**{**s.__dict__, "shape": "circle"}))[:, 0] for s in scenes]
    table = alignment_table({"right": right, "circles only": wrong_shape}, prompts)
    assert table.columns == ("model", "background", "colour", "shape", "all-correct")
    assert table.rows[0] == ("right", 1.0, 1.0, 1.0, 1.0)
    assert table.rows[1] == ("circles only", 1.0, 1.0, pytest.approx(1 / 3), pytest.approx(1 / 3))


def test_captions_round_trip_and_bad_captions_are_refused():
    for motion in shapes.MOTIONS:
        scene = shapes.Scene("circle", "red", "blue", motion)
        assert shapes.parse_caption(scene.caption).combination == scene.combination
        assert shapes.parse_caption(scene.caption).motion == motion
        assert shapes.is_caption(scene.caption)
    with pytest.raises(ValueError, match="not a toy-world caption"):
        shapes.parse_caption("a purple hexagon")
    assert not shapes.is_caption("a purple hexagon") and not shapes.is_caption("a red fox in the snow")


def test_held_out_combinations_are_never_trained_yet_every_part_is():
    held, train = shapes.held_out_combinations(), shapes.training_combinations()
    assert len(held) == 24 and not set(held) & set(train) and len(held) + len(train) == 90
    assert {(c, b) for _, c, b in train} == {(c, b) for _, c, b in shapes.all_combinations()}
    assert {(s, c) for s, c, _ in train} == {(s, c) for s, c, _ in shapes.all_combinations()}
    _, captions = shapes.sample_batch(random.Random(0), 400)
    assert not {shapes.parse_caption(c).combination for c in captions} & set(held)


def test_moving_shapes_move_by_their_speed_and_stay_inside():
    scene = shapes.Scene("square", "red", "blue", "right", 24, 20.0, 30.0, 3)
    clip = shapes.render(scene, shapes.NUM_FRAMES)
    red = (clip[0] > 0.5)  # (T, H, W): the red channel is high only on the shape
    first_columns = [torch.nonzero(red[t].any(0))[0].item() for t in range(shapes.NUM_FRAMES)]
    assert [b - a for a, b in zip(first_columns, first_columns[1:])] == [3, 3, 3, 3]
    rng = random.Random(1)
    for _ in range(200):
        s = shapes.random_scene(rng, shapes.all_combinations())
        step_x, step_y = shapes._STEP[s.motion]
        for f in range(shapes.NUM_FRAMES):
            x, y = s.x + step_x * s.speed * f, s.y + step_y * s.speed * f
            # On a canvas with a 64-pixel margin every pixel of the shape is drawn: none may be lost at the edge.
            whole = shapes.shape_mask(s.shape, s.size, x + 64, y + 64, 192).sum()
            assert shapes.shape_mask(s.shape, s.size, x, y).sum() == whole


def test_word_tokenizer_knows_every_caption_word():
    tokenizer = tw.build_tokenizer()
    ids = tokenizer("a yellow triangle moving down on a black background").input_ids
    assert 2 not in ids and ids[-1] == 1 and len(ids) == 10  # no <unk>, ends with </s>
    assert tokenizer("").input_ids == [1]  # the empty negative prompt WanPipeline encodes


def test_padded_text_attention_equals_the_pipelines_512_token_text():
    recipe = tw.ToyWorldRecipe(layers=2)
    tokenizer = tw.build_tokenizer()
    torch.manual_seed(0)
    transformer, text_encoder = tw.build_transformer(recipe).eval(), tw.build_text_encoder(len(tokenizer), recipe).eval()
    for p in transformer.parameters():
        p.data.normal_(0, 0.2)  # large weights, so any difference in attention shows
    captions = ["a red circle moving left on a blue background", "a blue square on a red background", ""]
    x, t = torch.randn(3, 16, 1, 8, 8), torch.tensor([900.0, 300.0, 10.0])
    with torch.no_grad():
        full = tokenizer(captions, padding="max_length", max_length=512, return_tensors="pt")
        padded = text_encoder(full.input_ids, full.attention_mask).last_hidden_state * full.attention_mask[..., None]
        reference = transformer(x, timestep=t, encoder_hidden_states=padded).sample
        processor = text_padding.install(transformer.blocks)
        short = tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
        out = transformer(x, timestep=t, encoder_hidden_states=tw.encode_text(text_encoder, short, processor)).sample
        processor.bias = None  # the same short text without the padding weight is a different attention
        unweighted = transformer(x, timestep=t, encoder_hidden_states=tw.encode_text(text_encoder, short, None)).sample
    scale = reference.abs().max()
    # Same maths, different summation order over 512 vs 17 keys: a float32 rounding tolerance.
    assert (out - reference).abs().max() <= 1e-5 * scale
    assert (unweighted - reference).abs().max() > 1e-3 * scale


def test_flow_batch_follows_wan_conventions():
    latents = torch.randn(256, 16, 1, 8, 8)
    x_t, timesteps, target = tw.flow_batch(latents, (0.875, 1.0), 3.0, torch.Generator().manual_seed(0))
    sigma = timesteps / 1000
    assert sigma.min() >= 0.875 and sigma.max() <= 1.0
    noise = target + latents
    torch.testing.assert_close(x_t, (1 - sigma.view(-1, 1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1, 1) * noise)


def test_refine_patches_keeps_flat_regions_and_averages_the_head():
    recipe = tw.ToyWorldRecipe(layers=1)
    torch.manual_seed(0)
    coarse = tw.build_transformer(recipe, patch=2)
    fine = tw.build_transformer(recipe, patch=1)
    fine.load_state_dict(tw.refine_patches(coarse.state_dict(), 2, 1))
    flat = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 1, 8, 8)  # every latent pixel the same
    with torch.no_grad():
        coarse_tokens, fine_tokens = coarse.patch_embedding(flat), fine.patch_embedding(flat)
        assert coarse_tokens.shape[-2:] == (4, 4) and fine_tokens.shape[-2:] == (8, 8)
        torch.testing.assert_close(fine_tokens[..., :4, :4], coarse_tokens, rtol=1e-5, atol=1e-6)
        token = torch.randn(5, coarse.proj_out.in_features)
        by_position = coarse.proj_out(token).view(5, 2, 2, 16)  # Wan's (p_h, p_w, C) order
        torch.testing.assert_close(fine.proj_out(token), by_position.mean((1, 2)), rtol=1e-5, atol=1e-6)
    weights = coarse.state_dict()
    refined = tw.refine_patches(weights, 2, 1)
    assert all(torch.equal(refined[k], weights[k]) for k in weights if "patch_embedding" not in k and "proj_out" not in k)


TINY = dict(vae_steps=3, num_images=64, num_clips=64, shared_steps=4, fine_steps=2, expert_steps=2, decoder_steps=2, checkpoint_every=3,
            eval_every=10**6, layers=2, batch_images=8, batch_clips=4, vae_images=2, vae_clips=1)


@pytest.mark.slow
def test_make_toy_world_writes_a_wan_pipeline_and_resumes_bit_for_bit(tmp_path):
    from safetensors.torch import load_file

    from wandistiller import load_teacher

    recipe = tw.ToyWorldRecipe(**TINY)
    path = tw.make_toy_world(tmp_path / "world", recipe, progress=False)
    teacher = load_teacher(str(path))
    assert teacher.variant == "a14b"
    vae = teacher.pipe.vae.config
    assert vae.latents_std != [1.0] * 16 and len(vae.latents_mean) == 16
    work = tmp_path / "world.work"
    import json

    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["stage"] == "final")
    assert {"all-correct", "shape", "motion"} <= final.keys() and 0 <= final["motion"] <= 1
    assert [r["stage"] for r in records if "reconstruction" in r] == ["vae", "decoder"]
    trained_vae, tuned_vae = load_file(work / "vae.safetensors"), load_file(work / "decoder.safetensors")
    assert all(torch.equal(trained_vae[k], tuned_vae[k]) for k in trained_vae if ".encoder." in k or "quant_conv" in k
               and "post_quant" not in k)  # the experts' latents stay valid
    assert not all(torch.equal(trained_vae[k], tuned_vae[k]) for k in trained_vae if ".decoder." in k)
    finished = load_file(work / "shared.safetensors")
    # Interrupted after the step-3 checkpoint of the shared stage: the rerun continues from it.
    for name in ("shared.safetensors", "fine.safetensors", "high_noise.safetensors", "low_noise.safetensors", "high_noise_state.safetensors",
                 "low_noise_state.safetensors"):
        (work / name).unlink(missing_ok=True)
    assert load_file(work / "shared_state.safetensors")["step"].item() == 3
    # A work dir written before a recipe field existed resumes (that field at its default, as it trained).
    stored = json.loads((work / "recipe.json").read_text())
    del stored["vae_scale"], stored["vae_latent_noise"]
    (work / "recipe.json").write_text(json.dumps(stored))
    tw.make_toy_world(tmp_path / "world", recipe, progress=False, overwrite=True)
    resumed = load_file(work / "shared.safetensors")
    assert finished.keys() == resumed.keys()
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tw.make_toy_world(tmp_path / "world", recipe, progress=False)
    with pytest.raises(ValueError, match="another recipe"):
        tw.make_toy_world(tmp_path / "other", tw.ToyWorldRecipe(**{**TINY, "seed": 1}), work_dir=work, progress=False)


def test_recipe_file_changes_only_its_fields_and_bad_files_get_one_line(tmp_path, capsys):
    from wandistiller.cli import main

    good = tmp_path / "recipe.json"
    good.write_text('{"shared_steps": 7, "vae_latent_noise": 0.2}')
    recipe = tw.recipe_from_file(good, seed=3)
    assert (recipe.shared_steps, recipe.vae_latent_noise, recipe.seed) == (7, 0.2, 3)
    assert recipe.fine_steps == tw.ToyWorldRecipe().fine_steps
    assert tw.recipe_from_file(None) == tw.ToyWorldRecipe()
    (tmp_path / "typo.json").write_text('{"shared_stpes": 7}')
    (tmp_path / "broken.json").write_text('{"shared_steps": 7')
    (tmp_path / "list.json").write_text('[1]')
    for name, message in (("typo", "unknown fields ['shared_stpes']"), ("broken", "cannot read"),
                          ("list", "not a JSON object"), ("missing", "cannot read")):
        world = tmp_path / f"world_{name}"
        assert main(["make-toy-world", str(world), "--recipe", str(tmp_path / f"{name}.json")]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not world.exists() and not world.with_name(world.name + ".work").exists()


def test_vae_latent_noise_reaches_the_decoder_only_when_asked(tmp_path):
    """Same seed and data: the noise-free VAE equals the default one; latent noise changes what it learns."""
    from safetensors.torch import load_file

    base = dict(vae_steps=2, vae_images=2, vae_clips=1, checkpoint_every=100)
    weights = {}
    for noise in (0.0, 0.0, 0.5):
        work = tmp_path / f"vae_{len(weights)}"
        work.mkdir()
        torch.manual_seed(0)  # the VAE's initial weights
        tw.train_vae(work, tw.ToyWorldRecipe(**base, vae_latent_noise=noise), progress=False)
        weights[len(weights)] = load_file(work / "vae.safetensors")
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.parametrize("scale", [8, 4])
def test_vae_scale_sets_the_latent_grid_and_the_pipelines_factor(scale):
    vae = tw.build_vae(scale)
    x, _ = shapes.sample_batch(random.Random(0), 1, shapes.NUM_FRAMES)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    side = shapes.IMAGE_SIZE // scale
    assert tuple(z.shape) == (1, 16, 2, side, side)  # 5 frames -> 2 latent frames (4x in time) either way
    assert vae.config.scale_factor_spatial == scale  # what WanPipeline and the kit divide image sizes by
    with pytest.raises(ValueError, match="vae_scale 5"):
        tw.build_vae(5)
