import hashlib
import json

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from wandistiller.cli import main
from wandistiller.toy import VARIANTS, make_tiny_wan


def _digests(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*.safetensors"))}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_wan_round_trip(tmp_path, variant):
    path = make_tiny_wan(tmp_path / variant, variant)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    pipe = WanPipeline.from_pretrained(path)
    image = pipe("a red fox in the snow", height=64, width=64, num_frames=1, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert image.shape == (1, 1, 64, 64, 3)
    channels = 48 if variant == "ti2v-5b" else 16
    assert pipe.transformer.config.in_channels == channels
    if variant == "a14b":
        assert pipe.config.boundary_ratio == 0.875
        a = pipe.transformer.state_dict()
        b = pipe.transformer_2.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), "the two experts must have different weights"
    else:
        assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    assert bool(pipe.config.expand_timesteps) == (variant == "ti2v-5b")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = _digests(make_tiny_wan(tmp_path / "a", seed=3))
    b = _digests(make_tiny_wan(tmp_path / "b", seed=3))
    c = _digests(make_tiny_wan(tmp_path / "c", seed=4))
    assert a == b
    assert a["transformer/diffusion_pytorch_model.safetensors"] != c["transformer/diffusion_pytorch_model.safetensors"]


def test_tokenizer_knows_the_prompt_words(tmp_path):
    pipe = WanPipeline.from_pretrained(make_tiny_wan(tmp_path / "t"))
    tokens = pipe.tokenizer.tokenize("a misty pine forest at dawn")
    assert tokens == ["▁a", "▁misty", "▁pine", "▁forest", "▁at", "▁dawn"]


def test_make_tiny_wan_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny_wan(target)
    assert (target / "notes.txt").read_text() == "precious"


def test_cli_make_tiny_teacher(tmp_path, capsys):
    assert main(["make-tiny-teacher", str(tmp_path / "t21"), "--variant", "2.1"]) == 0
    assert "written to" in capsys.readouterr().out
    assert WanTransformer3DModel.from_pretrained(tmp_path / "t21", subfolder="transformer").config.num_layers == 4
    assert main(["make-tiny-teacher", str(tmp_path / "t21")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_ranks_racing_to_build_the_tiny_teacher_all_get_it(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, WANDISTILLER_HOME=str(tmp_path))
    code = "from wandistiller.toy import tiny_wan_path; print(tiny_wan_path())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err[-500:] for _, err, _ in results]
    assert len({out for out, _, _ in results}) == 1
    WanPipeline.from_pretrained(results[0][0].strip())
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-wan-a14b-seed0"]  # no temporaries left behind
