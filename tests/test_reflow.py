"""Few-step students (issue 13): the reflow objective on the recorded teacher trajectories and the few-step sampler."""

import json
from types import SimpleNamespace

import pytest
import torch

import wandistiller.teacher
from wandistiller.cache import build_target_cache, load_target_cache
from wandistiller.data import TargetSpec, _prompt_noise, read_prompts, record_trajectories
from wandistiller.loops import _Dist, _reflow_batch, distill
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.reflow_pairs import PAIRS_FILE, StudentPairs, pair_noise, sample_student_pairs, student_pairs
from wandistiller.teacher import load_teacher, read_teacher_info

PROMPTS = ["a red fox sitting in fresh snow", "a lighthouse on a rocky coast", "a bowl of ramen"]
SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1, "image_size": 64}
STEPS = 4


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """A trajectory cache of 3 prompts x 2 trajectories x 4 steps on the tiny teacher, shards of 2 prompts, in
    float32 (the noise and final latents exactly as the sampler had them)."""
    root = tmp_path_factory.mktemp("reflow_cache")
    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)
    spec = TargetSpec(num_inference_steps=STEPS, trajectories_per_prompt=2, shard_prompts=2, dtype="float32")
    build_target_cache(teacher, PROMPTS, root / "cache", spec, progress=False)
    targets, _ = load_target_cache(root / "cache", teacher.fingerprint, spec, PROMPTS)
    return teacher, spec, targets


def test_cached_pairs_are_the_teachers_noise_and_its_samplers_final_latents(trajectories):
    teacher, spec, targets = trajectories
    noise, final = targets.reflow_pairs()
    assert noise.shape == final.shape == (len(PROMPTS) * 2, 16, 8, 8)
    # trajectory j of prompt i (id 2 i + j) started from that prompt's noise sample j ...
    expected_noise = torch.cat([_prompt_noise(teacher, spec, i, j) for i in range(3) for j in range(2)])
    torch.testing.assert_close(noise, expected_noise[:, :, 0], rtol=0, atol=0)
    # ... and ended at the final latents of the teacher's own sampler run again here from that noise
    embeds, negative = teacher.encode_prompts(PROMPTS, negative="")
    _, expected_final = record_trajectories(teacher, embeds.repeat_interleave(2, 0),
                                            negative[:1].expand(6, -1, -1), expected_noise, spec, progress=False)
    torch.testing.assert_close(final, expected_final[:, :, 0], rtol=0, atol=0)
    # every record names its trajectory, whose prompt is the record's prompt
    t = targets.tensors
    assert torch.equal(t["trajectory"] // 2, t["prompt_index"])
    assert torch.equal(torch.bincount(t["trajectory"]), torch.full((6,), STEPS))


def test_reflow_batch_is_the_straight_path_between_the_pairs(trajectories):
    _, _, targets = trajectories
    noise, final = targets.reflow_pairs()
    rows = [0, 5, 11, 17, 23]
    batch = {key: value[rows] for key, value in targets.tensors.items()}
    out = _reflow_batch(batch, targets, seed=3, step=7, micro=1, rt=_Dist())
    # by hand, from the cached pairs: sigma = t / 1000, x_t = (1 - sigma) x0 + sigma z, target z - x0
    z, x0 = noise[batch["trajectory"]], final[batch["trajectory"]]
    t = out["timesteps"]
    assert t.dtype == torch.float32 and ((t > 0) & (t < 1000)).all() and len(set(t.tolist())) == len(rows)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["latents"], (1 - sigma) * x0 + sigma * z, rtol=0, atol=0)
    torch.testing.assert_close(out["velocity"], z - x0, rtol=0, atol=0)  # the one target, guided or not
    assert "v_cond" not in out and "v_uncond" not in out
    assert torch.equal(out["prompt_index"], batch["prompt_index"])
    # the noise levels are a function of (seed, step, micro-batch): the same again, others elsewhere
    again = _reflow_batch(batch, targets, seed=3, step=7, micro=1, rt=_Dist())
    assert torch.equal(again["timesteps"], t)
    for other in (dict(seed=4, step=7, micro=1), dict(seed=3, step=8, micro=1), dict(seed=3, step=7, micro=0)):
        assert not torch.equal(_reflow_batch(batch, targets, rt=_Dist(), **other)["timesteps"], t)
    # two ranks, each with the rows the sampler deals it, draw what one process draws for the whole batch
    whole = {key: value[rows + rows[:1]] for key, value in targets.tensors.items()}
    levels = _reflow_batch(whole, targets, seed=3, step=7, micro=1, rt=_Dist())["timesteps"]
    for rank in (0, 1):
        part = {key: value[rank::2] for key, value in whole.items()}
        got = _reflow_batch(part, targets, seed=3, step=7, micro=1, rt=_Dist(rank=rank, world_size=2))
        assert torch.equal(got["timesteps"], levels[rank::2])


@pytest.mark.parametrize("steps", [1, 3, 4, 8])
def test_reflow_noise_levels_are_the_few_step_samplers_own(steps):
    """With sampler_steps=n reflow trains at exactly the timesteps the few-step pipeline runs at n steps, each
    about equally often; pure_noise moves that share of rows to sigma 1."""
    from wandistiller.loss import reflow_timesteps
    from wandistiller.pipeline import WanLitePipeline, few_step_scheduler

    # the pipeline's own step setting, on a saved few-step pipeline's config and scheduler alone
    runs = SimpleNamespace(config={"few_step": True}, scheduler=few_step_scheduler())
    WanLitePipeline._set_timesteps(runs, steps, "cpu")
    by_hand = [1000 * (steps - k) / steps for k in range(steps)]  # sigma 1, 1 - 1/n, ..., 1/n
    torch.testing.assert_close(runs.scheduler.timesteps, torch.tensor(by_hand), rtol=0, atol=1e-4)
    n = 8000
    t = reflow_timesteps(n, generator=torch.Generator().manual_seed(0), sampler_steps=steps)
    assert t.dtype == torch.float32 and t.shape == (n,)
    assert set(t.tolist()) == set(runs.scheduler.timesteps.tolist())
    share = torch.stack([(t == level).float().mean() for level in runs.scheduler.timesteps])
    assert (share - 1 / steps).abs().max() < 0.02
    t = reflow_timesteps(n, generator=torch.Generator().manual_seed(0), sampler_steps=steps, pure_noise=0.4)
    assert set(t.tolist()) == set(runs.scheduler.timesteps.tolist())
    assert abs((t == 1000).float().mean() - (0.4 + 0.6 / steps)) < 0.02
    # the default: sigma ~ U(0, 1), off any grid
    t = reflow_timesteps(n, generator=torch.Generator().manual_seed(0))
    assert len(set(t.tolist())) > 0.99 * n and abs(t.mean() - 500) < 15


def test_reflow_batch_on_student_pairs_takes_one_pair_of_each_records_prompt(trajectories):
    _, _, targets = trajectories
    noise = torch.randn(5, len(PROMPTS), 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pairs = StudentPairs(noise, torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)))
    rows = list(range(0, 24, 2))
    batch = {key: value[rows] for key, value in targets.tensors.items()}
    out = _reflow_batch(batch, targets, seed=3, step=7, micro=1, rt=_Dist(), pairs=pairs)
    # the same noise levels as on the teacher's pairs; the point is on the straight path of one of the record's
    # prompt's own pairs, found here by searching all of them
    assert torch.equal(out["timesteps"], _reflow_batch(batch, targets, seed=3, step=7, micro=1, rt=_Dist())["timesteps"])
    sigma = (out["timesteps"] / 1000).view(-1, 1, 1, 1)
    chosen = []
    for i, p in enumerate(batch["prompt_index"].tolist()):
        z, x0 = pairs.noise[:, p], pairs.final[:, p]
        path = (1 - sigma[i]) * x0 + sigma[i] * z
        match = [k for k in range(5) if torch.equal(out["latents"][i], path[k])]
        assert len(match) == 1 and torch.equal(out["velocity"][i], z[match[0]] - x0[match[0]])
        chosen.append(match[0])
    assert len(set(chosen)) > 2  # not one pair for every record
    # two ranks draw what one process draws for the whole batch
    for rank in (0, 1):
        part = {key: value[rank::2] for key, value in batch.items()}
        got = _reflow_batch(part, targets, seed=3, step=7, micro=1, rt=_Dist(rank=rank, world_size=2), pairs=pairs)
        assert torch.equal(got["latents"], out["latents"][rank::2])


def test_student_pairs_are_drawn_once_and_a_run_with_other_settings_is_refused(tmp_path):
    calls = []

    class Pipe:  # a real sampler is tested end to end below; this one counts and returns its noise halved
        transformer = torch.nn.Linear(1, 1)

        def __call__(self, prompt_embeds, latents, num_inference_steps, guidance_scale, output_type):
            calls.append((len(prompt_embeds), num_inference_steps, guidance_scale))
            return type("Out", (), {"images": latents / 2})

    settings = {"student_init": "/s", "per_prompt": 2, "steps": 3, "seed": 5, "prompts": 3}
    args = (lambda: Pipe(), lambda idx: torch.zeros(len(idx), 4, 8), 3, (16, 8, 8))
    first = student_pairs(tmp_path, settings, *args, is_main=True, progress=False)
    assert calls == [(6, 3, 1.0)]  # the 2 x 3 (pair, prompt) rows in one batch, 3 steps, guidance 1
    torch.testing.assert_close(first.noise, pair_noise(5, 2, 3, (16, 8, 8)), rtol=0, atol=0)
    torch.testing.assert_close(first.final, first.noise / 2, rtol=0, atol=0)
    again = student_pairs(tmp_path, settings, *args, is_main=True, progress=False)  # a resume reads them back
    assert len(calls) == 1 and torch.equal(again.final, first.final)
    before = (tmp_path / PAIRS_FILE).read_bytes()
    with pytest.raises(ValueError, match="holds reflow pairs drawn with other settings than this run's: resume with"):
        student_pairs(tmp_path, {**settings, "per_prompt": 3}, *args, is_main=True, progress=False)
    assert (tmp_path / PAIRS_FILE).read_bytes() == before and len(calls) == 1
    assert not torch.equal(pair_noise(6, 2, 3, (16, 8, 8)), first.noise)


def test_reflow_from_a_velocity_student_exports_the_few_step_pipeline(tmp_path):
    """A velocity run, then reflow from its student on its cache: the first reflow step's loss is the straight-path
    loss computed here by hand; the reflow pipeline samples with Euler at shift 1 by default, the velocity one with
    the teacher's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from wandistiller.pipeline import WanLitePipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]), encoding="utf-8")
    common = dict(data_path=str(prompts), student_config=SMALL, num_inference_steps=STEPS, batch_size=4,
                  max_steps=2, lr=1e-3, ema_decay=0, progress=False, save_samples=False,
                  cache_dir=str(tmp_path / "cache"))
    velocity = distill(output_dir=str(tmp_path / "velocity"), student_init="random", **common)
    # noise levels on the 2-step sampler's grid, half the rows at pure noise
    reflow = distill(output_dir=str(tmp_path / "reflow"), student_init=str(velocity.student_path),
                     objective="reflow", reflow_sampler_steps=2, reflow_pure_noise=0.5, **common)
    assert json.loads((tmp_path / "reflow" / "distill_config.json").read_text())["objective"] == "reflow"

    # the first step by hand: the loop's first batch (its sampler, seed 0, epoch 0) on the straight paths
    spec = TargetSpec(num_inference_steps=STEPS, height=64, width=64)
    targets, _ = load_target_cache(tmp_path / "cache", read_teacher_info("tiny").fingerprint(), spec,
                                   read_prompts(prompts))
    sampler = torch.utils.data.DistributedSampler(targets, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    batch = next(iter(torch.utils.data.DataLoader(targets, batch_size=4, sampler=sampler, drop_last=True)))
    t = _reflow_batch(batch, targets, seed=0, step=0, micro=0, rt=_Dist(), sampler_steps=2, pure_noise=0.5)["timesteps"]
    assert set(t.tolist()) <= {1000.0, 500.0}
    noise, final = targets.reflow_pairs()
    z, x0 = noise[batch["trajectory"]], final[batch["trajectory"]]
    sigma = (t / 1000).view(-1, 1, 1, 1)
    student = WanLiteTransformer2DModel.from_pretrained(velocity.student_path)
    with torch.no_grad():
        pred = student((1 - sigma) * x0 + sigma * z, t, targets.prompt_embeds[batch["prompt_index"]]).sample
    # mean over each sample, then over the batch, as loss.velocity_loss reduces
    assert reflow.metrics[0]["loss"] == float((pred.float() - (z - x0)).pow(2).flatten(1).mean(1).mean())

    few = WanLitePipeline.from_pretrained(tmp_path / "reflow" / "pipeline")
    assert isinstance(few.scheduler, FlowMatchEulerDiscreteScheduler) and few.scheduler.config.shift == 1.0
    few.set_progress_bar_config(disable=True)
    embeds, start = targets.prompt_embeds[:1], noise[:1]
    latents = few(prompt_embeds=embeds, latents=start, num_inference_steps=2, output_type="latent").images
    assert few.scheduler.sigmas.tolist() == [1.0, 0.5, 0.0]  # two Euler steps of half the straight path each
    # by hand: x <- x + (sigma_next - sigma) v at sigma 1 and 1/2, one forward each (a CFG-distilled student)
    with torch.no_grad():
        x = start + (0.5 - 1.0) * few.transformer(start, torch.tensor([1000.0]), embeds).sample
        x = x + (0.0 - 0.5) * few.transformer(x, torch.tensor([500.0]), embeds).sample
    torch.testing.assert_close(latents, x, rtol=0, atol=0)
    assert few.config.few_step and few.config.cfg_distilled
    slow = WanLitePipeline.from_pretrained(tmp_path / "velocity" / "pipeline")
    assert isinstance(slow.scheduler, UniPCMultistepScheduler) and not slow.config.few_step


@pytest.mark.parametrize("params, message", [
    (dict(latent_source="noise"), r"^objective='reflow' trains on the \(noise, final latent\) pairs .*: set "
                                  r"latent_source='trajectory' \(got 'noise'\)$"),
    (dict(latent_source="images", images_path="/no/such"), "set latent_source='trajectory' \\(got 'images'\\)"),
    (dict(teacher_targets="online"), "without the teacher: set teacher_targets='cache'"),
    (dict(cfg_distill=False), "drop cfg_distill=False"),
    (dict(objective="consistency"), "objective must be one of velocity, reflow, got 'consistency'"),
    (dict(reflow_pairs="self"), "^reflow_pairs must be one of teacher, student, got 'self'$"),
    (dict(reflow_pairs="student", objective="velocity"), "sets where reflow's pairs come from: set objective='reflow'"),
    (dict(reflow_pairs="student"), "^reflow_pairs='student' samples its pairs with the student it starts from, and "
                                   "student_init='projection' cannot draw yet: set student_init to a velocity-"),
    (dict(reflow_pairs="student", reflow_pairs_per_prompt=0), "^reflow_pairs_per_prompt=0 must be a whole number"),
    (dict(reflow_sampler_steps=-1), r"^reflow_sampler_steps=-1 must be a whole number of at least 0 \(0: noise "),
    (dict(reflow_sampler_steps=2.0), r"^reflow_sampler_steps=2.0 must be a whole number"),
    (dict(reflow_pure_noise=1.0), r"^reflow_pure_noise=1.0 must be in \[0, 1\): the share of rows at pure noise"),
])
def test_reflow_without_recorded_trajectories_is_refused_in_one_line(tmp_path, monkeypatch, params, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the configuration was checked")

    monkeypatch.setattr(wandistiller.teacher, "load_teacher", refuse)
    with pytest.raises(ValueError, match=message) as err:
        distill(**{"objective": "reflow", "output_dir": str(tmp_path / "run"), "progress": False, **params})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_the_recorded_config_reruns_from_another_folder(tmp_path, monkeypatch):
    """distill_config.json keeps existing relative paths absolute (a notebook passes "../data/..."), so its
    settings rerun `distill` from anywhere; keywords (the tiny teacher, a random student) stay as given even where
    a folder of that name exists."""
    run_dir = tmp_path / "nb"
    run_dir.mkdir()
    (run_dir / "prompts.txt").write_text("\n".join(PROMPTS[:2]), encoding="utf-8")
    for keyword in ("tiny", "random"):  # folders named like keywords, which still mean the keywords
        (run_dir / keyword).mkdir()
    monkeypatch.chdir(run_dir)
    distill(output_dir="run", data_path="prompts.txt", cache_dir="cache", student_config=SMALL, student_init="random",
            num_inference_steps=STEPS, batch_size=4, max_steps=1, ema_decay=0, progress=False, save_samples=False)
    settings = json.loads((run_dir / "run" / "distill_config.json").read_text())
    assert settings["data_path"] == str(run_dir / "prompts.txt")
    assert settings["cache_dir"] == str(run_dir / "cache") and settings["output_dir"] == str(run_dir / "run")
    assert settings["teacher_path"] == "tiny" and settings["student_init"] == "random"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings.update(output_dir=str(tmp_path / "again"), max_steps=1)
    assert distill(**settings).steps == 1  # reads the same prompts, and the same cache, from another folder


def test_reflow_on_student_pairs_trains_on_what_the_velocity_student_samples(tmp_path):
    """reflow_pairs='student' end to end: the pairs file holds, for each prompt, the velocity student's own
    pipeline's final latents from the pairs' noise (its exported pipeline run again here), and a resume uses them."""
    from safetensors.torch import load_file

    from wandistiller.pipeline import WanLitePipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]), encoding="utf-8")
    common = dict(data_path=str(prompts), student_config=SMALL, num_inference_steps=STEPS, batch_size=4,
                  lr=1e-3, ema_decay=0, progress=False, save_samples=False, cache_dir=str(tmp_path / "cache"))
    velocity = distill(output_dir=str(tmp_path / "velocity"), student_init="random", max_steps=2, **common)
    reflow = dict(output_dir=str(tmp_path / "reflow"), student_init=str(velocity.student_path), objective="reflow",
                  reflow_pairs="student", reflow_pairs_per_prompt=3, reflow_pair_steps=STEPS, checkpoint_interval=1,
                  **common)
    distill(max_steps=1, **reflow)
    pairs = load_file(tmp_path / "reflow" / PAIRS_FILE)
    assert pairs["noise"].shape == pairs["final"].shape == (3, 2, 16, 8, 8)
    torch.testing.assert_close(pairs["noise"], pair_noise(0, 3, 2, (16, 8, 8)), rtol=0, atol=0)
    pipe = WanLitePipeline.from_pretrained(tmp_path / "velocity" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    spec = TargetSpec(num_inference_steps=STEPS, height=64, width=64)
    targets, _ = load_target_cache(tmp_path / "cache", read_teacher_info("tiny").fingerprint(), spec,
                                   read_prompts(prompts))
    for k in range(3):
        final = pipe(prompt_embeds=targets.prompt_embeds, latents=pairs["noise"][k], num_inference_steps=STEPS,
                     output_type="latent").images
        torch.testing.assert_close(pairs["final"][k], final, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pairs["final"][0], pairs["final"][1])  # each noise its own picture
    # in batches of 4 that cut across pairs (rows 0-3, then 4-5), each noise still gets its own prompt
    again = sample_student_pairs(pipe, targets.prompt_embeds, pairs["noise"], STEPS, batch_size=4, progress=False)
    torch.testing.assert_close(again.final, pairs["final"], rtol=1e-5, atol=1e-6)
    stamp = (tmp_path / "reflow" / PAIRS_FILE).stat().st_mtime_ns
    assert distill(max_steps=2, resume=True, **reflow).steps == 2
    assert (tmp_path / "reflow" / PAIRS_FILE).stat().st_mtime_ns == stamp  # read back, not drawn again
