"""Train the toy-world teacher: a real two-expert Wan 2.2 pipeline that draws the shapes world.

Stages, each resumable from `work_dir` (a killed run picks up at its last checkpoint):

1. `vae`: a small `AutoencoderKLWan` on clips and single frames; `latents_mean/std` measured on the data;
2. `latents`: the training set encoded once (posterior mean, normalised as `WanPipeline` decodes it);
3. `shared` then `fine`: one transformer and the UMT5 text encoder trained together with flow matching (a random frozen
   encoder cannot tell "red shape" from "red background"), caption dropout for classifier-free guidance; first
   at 2x2 patches (16 tokens, many images per step), then refined to one token per latent pixel (`refine_patches`);
4. `high_noise` / `low_noise`: the shared model fine-tuned on each side of the expert boundary, as Wan 2.2's
   two experts are;
5. `decoder`: the VAE decoder fine-tuned on slightly noisy latents (the encoder, hence the latents, fixed);
6. the pipeline folder (`WanPipeline.from_pretrained` loads it), written atomically.

Cross-attention during training skips the text's zero padding (`text_padding`): the same attention as over
WanPipeline's 512-row text, ~30x fewer rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import flow, shapes, text_padding
from .cache import save_atomically as _atomic_save
from .data import packaged_file
from .toy import write_pipeline

TOY_WORLD_PATH = packaged_file("data", "toy_world")
TEXT_LENGTH = flow.MAX_SEQUENCE_LENGTH  # the text the experts see at sampling time
BOUNDARY_RATIO = 0.875


@dataclasses.dataclass
class ToyWorldRecipe:
    """Sizes and schedule of the toy world (defaults: ~100 min on 2 CPU cores)."""

    seed: int = 0
    # VAE
    vae_steps: int = 2000
    vae_images: int = 10
    vae_clips: int = 2
    vae_clip_every: int = 4  # clips cost as much as 10 frames: every 4th step, as for the transformer
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    vae_latent_noise: float = 0.0  # extra latent noise the decoder learns to undo, in units of each channel's std
    vae_scale: int = 8  # spatial compression: 8 (Wan 2.1's VAE) or 4 (a 16x16 latent; square corners survive)
    # cached training latents
    num_images: int = 24576
    num_clips: int = 3072
    # transformer + text encoder: the shared model trains first at `coarse_patch` (few tokens, many images per
    # step), then `fine_steps` at `patch` with the same tokens per step; the experts train at `patch`
    shared_steps: int = 12000
    fine_steps: int = 4000  # all-correct 0.50 at 2000, 0.625 at 4000, 6000 and 8000: 4000 is enough
    expert_steps: int = 1000
    coarse_patch: int = 2
    patch: int = 1  # one token per latent pixel: 2x2 patches of an 8x8 latent leave 16 tokens and blobby shapes
    batch_images: int = 128  # at coarse_patch; 1.5x the time of 64 per step on 2 cores: more samples per second
    batch_clips: int = 64
    clip_every: int = 4
    lr: float = 6e-4
    expert_lr: float = 2e-4
    warmup_steps: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    flow_shift: float = 3.0  # the shared model's training noise levels, and the scheduler's shift
    expert_flow_shift: float = 3.0  # the experts' noise levels in their range, shifted like the shared model's
    # decoder fine-tune on noisy latents (encoder frozen, so the experts' latents stay valid)
    decoder_steps: int = 400
    decoder_lr: float = 3e-4
    decoder_noise: float = 0.05  # latent noise, in units of each channel's std
    checkpoint_every: int = 250
    eval_every: int = 2000  # alignment of the EMA model on the held-out prompts, logged
    # architecture
    heads: int = 4
    head_dim: int = 32
    layers: int = 6
    ffn_dim: int = 512
    text_dim: int = 64


def recipe_from_file(path: str | Path | None, **overrides) -> ToyWorldRecipe:
    """The default recipe with the fields in a JSON file (and `overrides` that are not None) changed."""
    fields = {f.name for f in dataclasses.fields(ToyWorldRecipe)}
    values = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the recipe {path}: {error}; pass a JSON object of ToyWorldRecipe fields") from None
        if not isinstance(values, dict):
            raise ValueError(f"the recipe {path} is not a JSON object: write {{\"field\": value, ...}}")
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"the recipe {path} has unknown fields {unknown}: the fields are {sorted(fields)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ToyWorldRecipe(**values)


# ---------------------------------------------------------------------------------------------- components


def build_tokenizer():
    """A word-level T5 tokenizer over the caption words (`<pad>`=0, `</s>`=1, `<unk>`=2)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    vocab += [(f"▁{word}", -1.0) for word in shapes.VOCABULARY]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_LENGTH)


def build_text_encoder(vocab_size: int, recipe: ToyWorldRecipe):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=recipe.text_dim, d_kv=16, d_ff=2 * recipe.text_dim, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def build_vae(scale: int = 8):
    """A tiny Wan VAE, 4x in time and `scale` (8 or 4) in space."""
    from diffusers import AutoencoderKLWan

    if scale not in (4, 8):
        raise ValueError(f"vae_scale {scale} is not supported: use 8 (Wan's) or 4")
    dim_mult, temporal = ([1, 2, 4, 4], [False, True, True]) if scale == 8 else ([1, 2, 4], [True, True])
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=12, z_dim=16, dim_mult=dim_mult, num_res_blocks=1, attn_scales=[],
        temperal_downsample=temporal, latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_spatial=scale,
    )


def build_transformer(recipe: ToyWorldRecipe, patch: int | None = None):
    from diffusers import WanTransformer3DModel

    patch = patch or recipe.patch
    return WanTransformer3DModel(
        patch_size=(1, patch, patch), num_attention_heads=recipe.heads, attention_head_dim=recipe.head_dim, in_channels=16,
        out_channels=16, text_dim=recipe.text_dim, freq_dim=256, ffn_dim=recipe.ffn_dim, num_layers=recipe.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )


def build_scheduler(recipe: ToyWorldRecipe):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   num_train_timesteps=flow.NUM_TRAIN_TIMESTEPS, flow_shift=recipe.flow_shift)


# ------------------------------------------------------------------------------------------ checkpoint files


def _save_state(path: Path, modules: dict, optimizer=None, step: int = 0) -> None:
    """Weights as safetensors, optimiser state beside them (loaded back with weights_only=True)."""
    tensors = {f"{name}.{key}": value.detach().clone() for name, module in modules.items()
               for key, value in module.state_dict().items()}
    tensors["step"] = torch.tensor(step)
    if optimizer is not None:
        tmp = path.with_suffix(f".optim.{os.getpid()}.tmp")
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, path.with_suffix(".optim.pt"))
    _atomic_save(tensors, path)  # written last: its presence says the whole state is on disk


def _load_state(path: Path, modules: dict, optimizer=None) -> int:
    from safetensors.torch import load_file

    tensors = load_file(path)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path.with_suffix(".optim.pt"), weights_only=True))
    return int(tensors["step"])


def _log(work: Path, record: dict) -> None:
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _seed(*parts) -> int:
    """A seed that is the same in every process (Python's str hash is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------ the training loop


def _finished(work: Path, stage: str, modules: dict) -> bool:
    """Load a stage's final weights into `modules` when the stage already finished."""
    done = work / f"{stage}.safetensors"
    if done.exists():
        _load_state(done, modules)
    return done.exists()


def _run_stage(work: Path, stage: str, modules: dict, optimizer, step_loss, *, steps: int, warmup: int, floor: float,
               recipe: ToyWorldRecipe, progress: bool, after_step=None) -> None:
    """Every stage's loop: resume from `<stage>_state`, then AdamW steps on `step_loss(step)` with gradient
    clipping and warmup + cosine, logging every 25 steps and checkpointing `modules` + optimiser.

    Each step's data and noise are a function of (seed, stage, step), so a resumed run is the uninterrupted one.
    """
    state = work / f"{stage}_state.safetensors"
    start = _load_state(state, modules, optimizer) if state.exists() else 0
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, warmup, floor), last_epoch=start - 1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(range(start, steps), desc=f"toy world: {stage}", disable=not progress, initial=start, total=steps)
    smooth = None
    for step in bar:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        if after_step is not None:
            after_step(step)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smooth:.4f}")
        if step % 25 == 0:
            _log(work, {"stage": stage, "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
        if (step + 1) % recipe.checkpoint_every == 0:
            _save_state(state, modules, optimizer, step + 1)


def _reconstruction_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + L1: the L1 term keeps corners and edges sharp, which the shape scorer needs."""
    return F.mse_loss(decoded, target) + F.l1_loss(decoded, target)


def _vae_batches(recipe: ToyWorldRecipe, step: int) -> list[tuple[int, int]]:
    """(count, frames) rendered at `step`: single frames every step, 5-frame clips every `vae_clip_every`-th."""
    batches = [(recipe.vae_images, 1)]
    if step % recipe.vae_clip_every == recipe.vae_clip_every - 1:
        batches.append((recipe.vae_clips, shapes.NUM_FRAMES))
    return batches


@torch.no_grad()
def reconstruction_alignment(vae, count: int = 96, seed: int = 0):
    """How many shapes survive encode + decode (posterior mean), scored like generated images."""
    from .alignment import alignment

    x, captions = shapes.sample_batch(random.Random(f"reconstruction-{seed}"), count, 1)
    decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
    return alignment(list(decoded[:, :, 0]), captions)


def _step_generators(recipe: ToyWorldRecipe, stage: str, step: int) -> tuple[random.Random, torch.Generator]:
    return random.Random(f"{stage}-{recipe.seed}-{step}"), torch.Generator().manual_seed(_seed(recipe.seed, stage, step))


# -------------------------------------------------------------------------------------------------- 1. VAE


def train_vae(work: Path, recipe: ToyWorldRecipe, progress: bool = True):
    """Reconstruction + small KL on fresh renders every step (frames and 5-frame clips).

    The decoder sees each latent with extra Gaussian noise of `vae_latent_noise` x each channel's std over the
    batch (detached): sampled latents are never exact encodings, and a decoder trained on exact ones turns
    small errors into dented edges. The encoder learns a latent space in which such errors do not bend shapes.
    """
    vae = build_vae(recipe.vae_scale)
    if _finished(work, "vae", {"vae": vae}):
        return vae.eval()

    def step_loss(step):
        rng, generator = _step_generators(recipe, "vae", step)
        loss = 0.0
        for count, frames in _vae_batches(recipe, step):
            x, _ = shapes.sample_batch(rng, count, frames)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            if recipe.vae_latent_noise:
                spread = posterior.mean.detach().std(dim=(0, 2, 3, 4), keepdim=True)
                z = z + recipe.vae_latent_noise * spread * torch.randn(z.shape, generator=generator)
            loss = loss + _reconstruction_loss(vae.decode(z).sample, x) \
                + recipe.kl_weight * posterior.kl().mean() / z[0].numel()
        return loss

    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    _run_stage(work, "vae", {"vae": vae}, optimizer, step_loss, steps=recipe.vae_steps, warmup=50, floor=0.02,
               recipe=recipe, progress=progress)
    _save_state(work / "vae.safetensors", {"vae": vae.eval()})
    _log(work, {"stage": "vae", "reconstruction": reconstruction_alignment(vae).as_row()})
    return vae


def finetune_decoder(work: Path, vae, recipe: ToyWorldRecipe, progress: bool = True):
    """Sharpen the decoder and make it robust to the small latent errors a sampler leaves.

    The encoder is frozen, so latents cached for the experts stay valid. Sampled latents are never exactly a
    clean encoding; a decoder that saw only clean ones turns small errors into dented shapes.
    """
    if _finished(work, "decoder", {"vae": vae}):
        return vae.eval()
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    def step_loss(step):
        rng, generator = _step_generators(recipe, "decoder", step)
        loss = 0.0
        for count, frames in _vae_batches(recipe, step):
            x, _ = shapes.sample_batch(rng, count, frames)
            with torch.no_grad():
                mu = vae.encode(x).latent_dist.mean
            z = mu + recipe.decoder_noise * std * torch.randn(mu.shape, generator=generator)
            loss = loss + _reconstruction_loss(vae.decode(z).sample, x)
        return loss

    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    _run_stage(work, "decoder", {"vae": vae}, optimizer, step_loss, steps=recipe.decoder_steps, warmup=20,
               floor=0.05, recipe=recipe, progress=progress)
    _save_state(work / "decoder.safetensors", {"vae": vae.eval()})
    _log(work, {"stage": "decoder", "reconstruction": reconstruction_alignment(vae).as_row()})
    return vae


# ---------------------------------------------------------------------------------------------- 2. latents


@torch.no_grad()
def encode_dataset(work: Path, vae, tokenizer, recipe: ToyWorldRecipe, progress: bool = True) -> dict:
    """Encode the training set once; set the VAE's latents_mean/std from it (stored in the VAE's config)."""
    path = work / "latents.safetensors"
    if not path.exists():
        tensors = {}
        for name, count, frames in (("images", recipe.num_images, 1), ("clips", recipe.num_clips, shapes.NUM_FRAMES)):
            rng = random.Random(f"latents-{recipe.seed}-{name}")
            mus, captions = [], []
            for _ in tqdm(range(0, count, 64), desc=f"toy world: encode {name}", disable=not progress):
                x, caps = shapes.sample_batch(rng, 64, frames)
                mus.append(vae.encode(x).latent_dist.mean)
                captions += caps
            tensors[name] = torch.cat(mus)[:count]
            ids = tokenizer(captions[:count], padding="max_length", max_length=16, truncation=True,
                            return_tensors="pt").input_ids
            tensors[f"{name}_ids"] = ids
        # Per-channel statistics over every latent pixel of images and clips alike.
        flat = torch.cat([tensors["images"].transpose(0, 1).flatten(1), tensors["clips"].transpose(0, 1).flatten(1)], 1)
        tensors["mean"], tensors["std"] = flat.mean(1), flat.std(1)
        _atomic_save(tensors, path)
    from safetensors.torch import load_file

    data = load_file(path)
    vae.register_to_config(latents_mean=data["mean"].tolist(), latents_std=data["std"].tolist())
    shape = (1, -1, 1, 1, 1)
    for name in ("images", "clips"):  # normalised as WanPipeline decodes: z = latents * std + mean
        data[name] = (data[name] - data["mean"].view(shape)) / data["std"].view(shape)
    return data


# ---------------------------------------------------------------------------------- 3./4. text + transformer


def encode_text(text_encoder, ids: torch.Tensor, processor) -> torch.Tensor:
    """Text states as WanPipeline builds them (cut at the true length, zeros after), compacted for `processor`.

    `processor` (from `text_padding.install`) gets the logit bias that makes the few rows here stand for the
    512 rows WanPipeline gives the experts; None leaves the text as it is.
    """
    mask = ids.ne(0)
    states = text_encoder(ids, mask.long()).last_hidden_state * mask[..., None]
    states = torch.cat([states, states.new_zeros(states.shape[0], 1, states.shape[2])], dim=1)
    if processor is None:
        return states
    states, processor.bias = text_padding.compact_text(states, TEXT_LENGTH)
    return states


def flow_batch(latents: torch.Tensor, sigma_range: tuple[float, float], shift: float, generator) -> tuple:
    """Noisy latents, timesteps and velocity targets (Wan: x_t = (1-s) x0 + s n, v = n - x0, t = 1000 s)."""
    u = torch.rand(latents.shape[0], generator=generator)
    sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * flow.shift_sigma(u, shift)
    noise = torch.randn(latents.shape, generator=generator)
    s = flow.per_sample(sigma, latents)
    return (1 - s) * latents + s * noise, flow.timestep_from_sigma(sigma), noise - latents


def _sigma_range(stage: str) -> tuple[float, float]:
    """Expert ranges in sigma: the high-noise expert serves t >= 875, the low-noise one t < 875."""
    full = (0.0, 1.0)
    return {"shared": full, "fine": full, "high_noise": (BOUNDARY_RATIO, 1.0), "low_noise": (0.0, BOUNDARY_RATIO)}[stage]


def refine_patches(weights: dict, coarse: int, fine: int) -> dict:
    """Transformer weights at patch `coarse` -> patch `fine` (coarse a multiple of fine), the rest unchanged.

    The patch embedding sums the kernel over each group of pixels that becomes one fine patch, so a flat region
    gives the same token as before; the output head averages its outputs over the same groups.
    """
    r = coarse // fine
    weights = dict(weights)
    w = weights["patch_embedding.weight"]  # (D, C, 1, coarse, coarse)
    weights["patch_embedding.weight"] = w.reshape(*w.shape[:3], fine, r, fine, r).sum((4, 6))
    for name in ("proj_out.weight", "proj_out.bias"):  # rows in Wan's (p_h, p_w, C) order
        t = weights[name]
        grouped = t.reshape(fine, r, fine, r, -1, *t.shape[1:]).mean((1, 3))
        weights[name] = grouped.reshape(-1, *t.shape[1:])
    return weights


def _stage_patch(stage: str, recipe: ToyWorldRecipe) -> int:
    return recipe.coarse_patch if stage == "shared" else recipe.patch


def _training_batch(data: dict, step: int, recipe: ToyWorldRecipe, generator, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (clips every `clip_every`-th step) with caption dropout; as many tokens per step at any patch size."""
    scale = (patch / recipe.coarse_patch) ** 2
    name, size = ("clips", recipe.batch_clips) if step % recipe.clip_every == recipe.clip_every - 1 \
        else ("images", recipe.batch_images)
    size = max(1, round(size * scale))
    index = torch.randint(0, data[name].shape[0], (size,), generator=generator)
    ids = data[f"{name}_ids"][index].clone()
    dropped = torch.rand(size, generator=generator) < recipe.caption_dropout
    ids[dropped] = 0
    ids[dropped, 0] = 1  # the empty prompt: just </s>, as WanPipeline encodes negative_prompt=""
    return data[name][index], ids


def train_transformer(work: Path, stage: str, data: dict, recipe: ToyWorldRecipe, init: dict | None,
                      vocab_size: int, progress: bool = True, evaluate=None) -> dict:
    """One training stage; returns the EMA weights {'transformer': state_dict, 'text_encoder': state_dict}."""
    patch = _stage_patch(stage, recipe)
    ema = {"transformer": build_transformer(recipe, patch), "text_encoder": build_text_encoder(vocab_size, recipe)}
    if _finished(work, stage, ema):
        return {k: m.state_dict() for k, m in ema.items()}
    live = {"transformer": build_transformer(recipe, patch), "text_encoder": build_text_encoder(vocab_size, recipe)}
    for name in live:  # the live model and its EMA start equal (the shared model's weights for an expert)
        if init is not None:
            live[name].load_state_dict(init[name])
        ema[name].load_state_dict(live[name].state_dict())
    transformer, text_encoder = live["transformer"], live["text_encoder"]
    train_text = stage in ("shared", "fine")  # the experts share the text encoder: frozen once they split
    text_encoder.requires_grad_(train_text).train(train_text)
    transformer.train()
    processor = text_padding.install(transformer.blocks)

    def step_loss(step):
        _, generator = _step_generators(recipe, stage, step)
        latents, ids = _training_batch(data, step, recipe, generator, patch)
        shift = recipe.flow_shift if stage in ("shared", "fine") else recipe.expert_flow_shift
        x_t, timesteps, target = flow_batch(latents, _sigma_range(stage), shift, generator)
        with torch.set_grad_enabled(train_text):
            text = encode_text(text_encoder, ids, processor)
        pred = transformer(x_t, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]
        return F.mse_loss(pred, target)

    ema_params = [p for m in ema.values() for p in m.parameters()]
    live_params = [p for m in live.values() for p in m.parameters()]

    def after_step(step):
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - recipe.ema_decay)
        if evaluate is not None and (step + 1) % recipe.eval_every == 0:
            _log(work, {"stage": stage, "step": step + 1, **evaluate(ema["transformer"], ema["text_encoder"]).as_row()})

    trained = [*transformer.parameters(), *(text_encoder.parameters() if train_text else [])]
    steps, lr = {"shared": (recipe.shared_steps, recipe.lr), "fine": (recipe.fine_steps, recipe.lr)}.get(
        stage, (recipe.expert_steps, recipe.expert_lr))
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.99), weight_decay=recipe.weight_decay)
    modules = {**live, **{f"ema_{name}": module for name, module in ema.items()}}
    _run_stage(work, stage, modules, optimizer, step_loss, steps=steps, floor=0.1, recipe=recipe, progress=progress,
               warmup=recipe.warmup_steps if stage in ("shared", "fine") else 50, after_step=after_step)
    _save_state(work / f"{stage}.safetensors", ema)
    return {k: m.state_dict() for k, m in ema.items()}


# ------------------------------------------------------------------------------------------ 5. the pipeline


def assemble_pipeline(vae, tokenizer, experts: dict[str, dict], recipe: ToyWorldRecipe):
    """A WanPipeline (Wan 2.2 A14B layout: high-noise `transformer`, low-noise `transformer_2`)."""
    from diffusers import WanPipeline

    high, low = build_transformer(recipe).eval(), build_transformer(recipe).eval()
    high.load_state_dict(experts["high_noise"]["transformer"])
    low.load_state_dict(experts["low_noise"]["transformer"])
    text_encoder = build_text_encoder(len(tokenizer), recipe).eval()
    text_encoder.load_state_dict(experts["high_noise"]["text_encoder"])
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(),
                       scheduler=build_scheduler(recipe), transformer=high, transformer_2=low,
                       boundary_ratio=BOUNDARY_RATIO)


def make_toy_world(path: str | Path, recipe: ToyWorldRecipe | None = None, *, work_dir: str | Path | None = None,
                   overwrite: bool = False, progress: bool = True, threads: int | None = None) -> Path:
    """Train the toy-world teacher and write it as a Wan pipeline folder at `path`.

    Resumable: intermediate weights live in `work_dir` (default `<path>.work`); run the same command again
    after an interruption and it continues from the last checkpoint of the stage it was in.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty: choose a new path or pass overwrite=True")
    recipe = recipe or ToyWorldRecipe()
    work = Path(work_dir) if work_dir else path.with_name(path.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    recipe_file = work / "recipe.json"
    if recipe_file.exists():
        # A field the stored recipe lacks was added to the kit later: that run trained with its default.
        stored = {**dataclasses.asdict(ToyWorldRecipe()), **json.loads(recipe_file.read_text())}
        if stored != dataclasses.asdict(recipe):
            raise ValueError(f"{work} holds a run with another recipe: pass the same recipe or a new work_dir")
    recipe_file.write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer()
    started = time.time()
    vae = train_vae(work, recipe, progress)
    data = encode_dataset(work, vae, tokenizer, recipe, progress)
    torch.manual_seed(recipe.seed + 1)

    def evaluate(transformer, text_encoder):  # one model as both experts: progress, not the final score
        weights = {"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict()}
        pipe = assemble_pipeline(vae, tokenizer, {"high_noise": weights, "low_noise": weights}, recipe)
        return teacher_alignment(pipe, progress=False)

    shared = train_transformer(work, "shared", data, recipe, None, len(tokenizer), progress,
                               evaluate if recipe.coarse_patch == recipe.patch else None)
    if recipe.coarse_patch != recipe.patch:
        shared["transformer"] = refine_patches(shared["transformer"], recipe.coarse_patch, recipe.patch)
        shared = train_transformer(work, "fine", data, recipe, shared, len(tokenizer), progress, evaluate)
    experts = {stage: train_transformer(work, stage, data, recipe, shared, len(tokenizer), progress)
               for stage in ("high_noise", "low_noise")}
    vae = finetune_decoder(work, vae, recipe, progress)
    pipe = assemble_pipeline(vae, tokenizer, experts, recipe)
    _log(work, {"stage": "final", **teacher_alignment(pipe, progress=False).as_row(), "motion": teacher_motion(pipe)})
    _log(work, {"stage": "done", "seconds": time.time() - started})
    return write_pipeline(pipe, path, overwrite=overwrite)


@torch.no_grad()
def teacher_alignment(pipe, prompts: list[str] | None = None, *, num_inference_steps: int = 30,
                      guidance_scale: float = 5.0, seed: int = 0, progress: bool = True):
    """All-correct and per-attribute rates of a Wan pipeline's single frames on the held-out prompts."""
    from .alignment import alignment

    prompts = prompts or shapes.held_out_prompts()
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=not progress)
    frames = pipe(prompt=prompts, height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, num_frames=1,
                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                  output_type="pt").frames  # (B, T, 3, H, W) in [0, 1]
    return alignment([f[0] * 2 - 1 for f in frames], prompts)


@torch.no_grad()
def teacher_motion(pipe, *, num_inference_steps: int = 30, guidance_scale: float = 5.0, seed: int = 0) -> float:
    """Fraction of 5-frame clips whose shape moves the way the prompt says (held-out combinations, each
    given one of the four directions in turn), read from pixels by `alignment.describe_motion`."""
    from .alignment import describe_motion

    moving = [shapes.MOTIONS[i % 4] for i in range(len(shapes.held_out_combinations()))]
    prompts = [dataclasses.replace(shapes.parse_caption(p), motion=m).caption
               for p, m in zip(shapes.held_out_prompts(), moving)]
    pipe.set_progress_bar_config(disable=True)
    clips = pipe(prompt=prompts, height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, num_frames=shapes.NUM_FRAMES,
                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                 generator=torch.Generator().manual_seed(seed), output_type="pt").frames  # (B, T, 3, H, W)
    return sum(describe_motion(list(clip * 2 - 1)) == m for clip, m in zip(clips, moving)) / len(prompts)


def toy_world_path() -> Path:
    """The committed toy-world teacher (`teacher_path="toy"`)."""
    if not (TOY_WORLD_PATH / "model_index.json").is_file():
        raise FileNotFoundError(f"the toy-world teacher is missing at {TOY_WORLD_PATH}: restore data/toy_world from git "
                                "or train it with `make toy-world`")
    return TOY_WORLD_PATH
