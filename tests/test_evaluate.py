import pytest
import torch

from wandistiller.evaluate import compare_speed_and_size, find_pipeline, find_student, forward_flops, num_params
from wandistiller.model import WanLiteTransformer2DModel
from wandistiller.pipeline import WanLitePipeline

SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1}


def test_find_student_prefers_ema_and_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run 03_distill.ipynb first"):
        find_student(tmp_path)
    for name in ("student", "student_ema"):
        (tmp_path / "distill" / name).mkdir(parents=True)
        (tmp_path / "distill" / name / "config.json").write_text("{}")
    assert find_student(tmp_path).name == "student_ema"
    assert find_student(tmp_path, tmp_path / "distill" / "student").name == "student"


def test_find_pipeline_in_its_folder_a_run_or_a_notebooks_output_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Wan-Lite pipeline in .*output_dir/pipeline"):
        find_pipeline(tmp_path)
    for folder in (tmp_path / "distill" / "pipeline", tmp_path / "run" / "pipeline"):
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
    assert find_pipeline(tmp_path) == tmp_path / "distill" / "pipeline"  # notebook 03: output_dir/distill
    assert find_pipeline(tmp_path / "run") == tmp_path / "run" / "pipeline"
    assert find_pipeline(tmp_path / "run" / "pipeline") == tmp_path / "run" / "pipeline"


def test_forward_flops_of_an_exact_student_equal_the_teachers(tiny_teacher):
    from wandistiller.projection import project

    config = tiny_teacher.transformer_config()
    full = {"hidden_size": config["num_attention_heads"] * config["attention_head_dim"],
            "depth": config["num_layers"], "num_heads": config["num_attention_heads"], "ffn_dim": config["ffn_dim"]}
    student, _ = project(tiny_teacher, full, width="truncate", expert="high_noise")
    teacher_flops = forward_flops(tiny_teacher.load_expert("transformer"), (8, 8))  # given one frame
    assert forward_flops(student, (8, 8)) == teacher_flops
    assert forward_flops(student, (16, 16)) > teacher_flops


def test_forward_flops_count_what_runs_on_a_real_prompt(tiny_teacher):
    """A student skips WanPipeline's zero padding of a real prompt, the teacher computes all 512 rows; on the meta
    device, where there are no values to find padding in, a student counts every row."""
    teacher = tiny_teacher.load_expert("transformer")
    student = WanLiteTransformer2DModel.from_student_config(SMALL, tiny_teacher.transformer_config(), seed=0)
    prompt = tiny_teacher.encode_prompts(["a red fox sitting in fresh snow"])
    assert forward_flops(teacher, (8, 8), text=prompt) == forward_flops(teacher, (8, 8))
    assert forward_flops(student, (8, 8), text=prompt) < forward_flops(student, (8, 8))
    with torch.device("meta"):
        meta_student = WanLiteTransformer2DModel.from_config(student.config)
    assert forward_flops(meta_student, (8, 8), "meta", text=prompt) == forward_flops(meta_student, (8, 8), "meta")


@pytest.mark.parametrize("cfg_distilled, student_forwards", [(True, 2), (False, 4)])
def test_speed_and_size_table(tiny_teacher, cfg_distilled, student_forwards):
    student = WanLiteTransformer2DModel.from_student_config(SMALL, tiny_teacher.transformer_config(), seed=0)
    pipe = WanLitePipeline.from_teacher(tiny_teacher, student, cfg_distilled=cfg_distilled)
    table = compare_speed_and_size(tiny_teacher, pipe, height=64, width=64, num_inference_steps=2, repeats=1)
    teacher_row, student_row, gain = table.to_records()
    assert teacher_row["params"] == num_params(tiny_teacher.load_expert("transformer"))
    assert student_row["params"] == num_params(student)
    # CFG: two forwards per step; a CFG-distilled student needs one, any other samples with the teacher's guidance
    assert (teacher_row["forwards/image"], student_row["forwards/image"]) == (4, student_forwards)
    assert teacher_row["FLOPs/image"] == 4 * teacher_row["forward FLOPs"]
    assert gain["FLOPs/image"] == f"{teacher_row['FLOPs/image'] / student_row['FLOPs/image']:.1f}x"
    assert all(row["images/s"] > 0 for row in (teacher_row, student_row))
    print(table)


def test_evaluation_holds_one_teacher_expert_at_a_time(monkeypatch):
    from wandistiller.evaluate import teacher_and_student_images
    from wandistiller.teacher import load_teacher

    teacher = load_teacher("tiny", device_strategy="cpu", load_experts=False)  # A14B-style: two experts
    assert not hasattr(teacher, "experts")  # loading every expert at once is explicit: load_all_experts()
    resident = []
    load = teacher.load_expert

    def load_and_count(name):
        module = load(name)
        resident.append(len(teacher.resident_experts()))
        return module

    monkeypatch.setattr(teacher, "load_expert", load_and_count)
    student = WanLiteTransformer2DModel.from_student_config(SMALL, teacher.transformer_config(), seed=0)
    pipe = WanLitePipeline.from_teacher(teacher, student)
    pipe.set_progress_bar_config(disable=True)
    images = teacher_and_student_images(teacher, pipe, ["a red circle", "a blue square"], height=64, width=64,
                                        num_inference_steps=2)
    assert [len(images[k]) for k in ("teacher", "student")] == [2, 2]
    compare_speed_and_size(teacher, pipe, height=64, width=64, num_inference_steps=2, repeats=1)
    assert resident and max(resident) == 1


def test_expert_images_are_each_expert_alone_and_the_teachers_own_sampling(tiny_teacher):
    """Each row against WanPipeline itself: with no boundary it runs `transformer` (high noise) at every step;
    with `transformer_2` in its place and its guidance, the low-noise expert; as configured, the teacher."""
    import numpy as np
    from diffusers import WanPipeline

    from wandistiller.evaluate import expert_images

    prompts, steps = ["a red circle", "a blue square"], 3
    rows = expert_images(tiny_teacher, prompts, height=64, width=64, num_inference_steps=steps, seed=3)
    high, low = tiny_teacher.expert_for_role("high_noise"), tiny_teacher.expert_for_role("low_noise")
    assert list(rows) == ["high-noise expert alone", "low-noise expert alone", "both experts"]
    experts = tiny_teacher.load_all_experts()
    components = dict(tiny_teacher.pipe.components)

    def wan(transformer, transformer_2, boundary_ratio, guidance):
        pipe = WanPipeline(**{**components, "transformer": transformer, "transformer_2": transformer_2},
                           boundary_ratio=boundary_ratio)
        pipe.set_progress_bar_config(disable=True)
        frames = pipe(prompt=prompts, negative_prompt="", height=64, width=64, num_frames=1,
                      num_inference_steps=steps, guidance_scale=guidance[0], guidance_scale_2=guidance[1],
                      generator=torch.Generator().manual_seed(3), output_type="np").frames
        return (frames[:, 0] * 255).round()

    g_high, g_low = tiny_teacher.guidance_for_expert(high), tiny_teacher.guidance_for_expert(low)
    expected = [wan(experts[high], None, None, (g_high, None)), wan(experts[low], None, None, (g_low, None)),
                wan(experts[high], experts[low], tiny_teacher.pipe.config.boundary_ratio, (g_high, g_low))]
    for (label, images), reference in zip(rows.items(), expected):
        got = np.stack([np.asarray(im, dtype=np.float64) for im in images])
        assert np.abs(got - reference).max() <= 1, label  # float rounding only: one 8-bit level
    assert any(np.asarray(a).tolist() != np.asarray(b).tolist() for a, b in zip(*list(rows.values())[:2]))


def test_step_count_images_share_the_teachers_noise(tiny_teacher):
    import numpy as np

    from wandistiller.evaluate import step_count_images, teacher_and_student_images

    student = WanLiteTransformer2DModel.from_student_config(SMALL, tiny_teacher.transformer_config(), seed=0)
    pipe = WanLitePipeline.from_teacher(tiny_teacher, student)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square"]
    rows = step_count_images(tiny_teacher, pipe, prompts, step_counts=(1, 3), teacher_steps=3, height=64, width=64,
                             seed=5)
    assert list(rows) == ["teacher, 3 steps", "student, 1 step", "student, 3 steps"]
    same = teacher_and_student_images(tiny_teacher, pipe, prompts, height=64, width=64, num_inference_steps=3, seed=5)
    for label, reference in (("teacher, 3 steps", same["teacher"]), ("student, 3 steps", same["student"])):
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(rows[label], reference)), label
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(rows["student, 1 step"], same["student"]))
