"""Every distill() run ends by exporting a self-contained Wan-Lite pipeline to output_dir/pipeline."""

import pytest
from safetensors.torch import load_file

from wandistiller.data import read_prompts
from wandistiller.evaluate import load_student_pipeline
from wandistiller.loops import distill
from wandistiller.vae2d import WanVAE2D

SMALL = {"hidden_size": 16, "depth": 2, "num_heads": 1, "image_size": 64}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def run_inputs(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(read_prompts()[:2]), encoding="utf-8")
    return dict(data_path=str(prompts), student_config=SMALL, student_init="random", batch_size=4, max_steps=2,
                progress=False, save_samples=False, cache_dir=str(tmp_path / "cache"))


def test_distill_exports_the_ema_student_with_its_guidance_mode(tmp_path, run_inputs):
    run = tmp_path / "run"
    result = distill(**run_inputs, output_dir=str(run))
    pipe = load_student_pipeline(run)  # the run folder is enough: it finds run/pipeline
    assert isinstance(pipe.vae, WanVAE2D) and pipe.text_encoder is not None and pipe.tokenizer is not None
    assert pipe.config.cfg_distilled and pipe.default_guidance_scale() == 1.0  # guided targets (tiny: CFG 4.0)
    exported = load_file(run / "pipeline" / "transformer" / WEIGHTS)
    ema, raw = load_file(result.ema_path / WEIGHTS), load_file(result.student_path / WEIGHTS)
    assert all((exported[k] == ema[k]).all() for k in ema)  # the EMA weights, bit for bit
    assert any((exported[k] != raw[k]).any() for k in raw)

    resumed = distill(**run_inputs, output_dir=str(run), resume=True)  # a resumed run re-exports in place
    assert resumed.steps == 2 and load_student_pipeline(run).config.cfg_distilled

    # conditional targets: a cache of their own (a cache keeps only the velocity its loss uses)
    unguided = distill(**{**run_inputs, "cache_dir": str(tmp_path / "cache_unguided")},
                       output_dir=str(tmp_path / "unguided"), cfg_distill=False)
    pipe = load_student_pipeline(unguided.output_dir)
    assert not pipe.config.cfg_distilled and pipe.default_guidance_scale() == 4.0  # the tiny A14B's guidance_scale


def test_a_folder_holding_only_a_pipeline_is_not_trained_over(tmp_path, run_inputs):
    (tmp_path / "run" / "pipeline").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"already holds a run \(pipeline\)"):
        distill(**run_inputs, output_dir=str(tmp_path / "run"))
    assert list((tmp_path / "run" / "pipeline").iterdir()) == []
