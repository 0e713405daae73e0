"""The embedded tiny Wan teacher: a structurally faithful Wan 2.x pipeline, built offline.

Real Wan weights are 100+ GB; this builds the same diffusers pipeline (WanPipeline, WanTransformer3DModel
experts, AutoencoderKLWan, UMT5EncoderModel, a T5 tokenizer, UniPC flow-matching scheduler) at a size that
loads in a fraction of a second, so every code path a real checkpoint takes is exercised for real.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .data import DEFAULT_PROMPTS_PATH, read_prompts
from .flow import MAX_SEQUENCE_LENGTH, NUM_TRAIN_TIMESTEPS

VARIANTS = ("a14b", "ti2v-5b", "2.1")

# Wan 2.2 A14B switches from the high-noise to the low-noise expert at t = 0.875 * NUM_TRAIN_TIMESTEPS.
A14B_BOUNDARY_RATIO = 0.875


def tiny_transformer_config(variant: str = "a14b") -> dict:
    """WanTransformer3DModel kwargs for a tiny expert: Wan's layout (patch 1x2x2, qk RMS-norm across heads)."""
    channels = 48 if variant == "ti2v-5b" else 16
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )


def _tiny_vae(variant: str):
    from diffusers import AutoencoderKLWan

    if variant == "ti2v-5b":
        # Wan 2.2 VAE: 48 latent channels, 16x spatial compression via a 2x2 pixel patchify + residual blocks.
        return AutoencoderKLWan(
            base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
        )
    return AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
    )


def _tiny_tokenizer(prompts: list[str]):
    """A T5 (Unigram) tokenizer whose vocabulary is the prompts' words, plus single characters as fallback.

    A Unigram trainer at this vocabulary size yields mostly single characters; whole words give the text
    encoder tokens that mean something.
    """
    from transformers import T5Tokenizer

    words = collections.Counter(w for p in prompts for w in re.findall(r"\w+|[^\w\s]", p.lower()))
    chars = sorted({c for p in prompts for c in p.lower() if not c.isspace()})
    total = sum(words.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", math.log(n / total)) for w, n in sorted(words.items())]
    vocab += [(c, -20.0) for c in chars]
    extra_ids = 8
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    return T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=MAX_SEQUENCE_LENGTH)


def _tiny_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_tiny_wan(variant: str = "a14b", seed: int = 0, prompts_path: str | Path = DEFAULT_PROMPTS_PATH):
    """Build the tiny Wan pipeline in memory (deterministic in `seed`)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny teacher variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    tokenizer = _tiny_tokenizer(read_prompts(prompts_path))
    torch.manual_seed(seed)
    text_encoder = _tiny_text_encoder(len(tokenizer)).eval()
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(variant).eval()
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(**tiny_transformer_config(variant)).eval()
    transformer_2 = None
    if variant == "a14b":
        torch.manual_seed(seed + 3)  # a different seed so the two experts really differ
        transformer_2 = WanTransformer3DModel(**tiny_transformer_config(variant)).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        flow_shift=5.0 if variant == "ti2v-5b" else 3.0,
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=A14B_BOUNDARY_RATIO if variant == "a14b" else None,
        expand_timesteps=variant == "ti2v-5b",
    )


def make_tiny_wan(path: str | Path, variant: str = "a14b", seed: int = 0, *, overwrite: bool = False,
                  prompts_path: str | Path = DEFAULT_PROMPTS_PATH) -> Path:
    """Write a tiny Wan pipeline directory that `WanPipeline.from_pretrained(path)` loads offline.

    The directory appears atomically (built under a temporary name, then renamed), so an interrupted build
    never leaves a half-written teacher. An existing directory is only replaced with `overwrite=True`.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty: choose a new path or pass overwrite=True")
    return write_pipeline(build_tiny_wan(variant, seed, prompts_path), path, overwrite=overwrite)


def write_pipeline(pipe, path: str | Path, *, overwrite: bool = False) -> Path:
    """`pipe.save_pretrained(path)`, atomically: built under a temporary name, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if overwrite and path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)  # refuses a non-empty target: another process (a torchrun rank) built it first
        except OSError:
            raise FileExistsError(f"{path} was created by another process while this one built it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def cache_home() -> Path:
    """Where WanDistiller keeps built artefacts (`$WANDISTILLER_HOME`, default ~/.cache/wandistiller)."""
    return Path(os.environ.get("WANDISTILLER_HOME", Path.home() / ".cache" / "wandistiller"))


def tiny_wan_path(variant: str = "a14b", seed: int = 0) -> Path:
    """The embedded tiny teacher's directory, built on first use (safe when several ranks race to build it).

    Its tokenizer is made from the packaged prompts, so the directory is named by their digest too: edited
    prompts get a teacher of their own instead of a stale one.
    """
    prompts_path = DEFAULT_PROMPTS_PATH
    digest = hashlib.sha256("\n".join(read_prompts(prompts_path)).encode()).hexdigest()[:12]
    path = cache_home() / f"tiny-wan-{variant}-seed{seed}" / f"prompts-{digest}"
    if not (path / "model_index.json").is_file():
        try:
            make_tiny_wan(path, variant, seed, prompts_path=prompts_path)
        except FileExistsError:
            if not (path / "model_index.json").is_file():
                raise
    return path
