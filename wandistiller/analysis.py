"""Look inside a Wan teacher (or a Wan-Lite student): what is 3D, which expert runs when, what blocks do.

The analysis behind notebooks 01 and 02. Everything reads the models through hooks or their configs and
changes nothing; full-size Wan experts are examined on the meta device (`meta_expert`), without memory. The
results are data (tables, scores, dataclasses); their figures and text are made in `viz`.

* `module_table`: parameters per module and which parts have a temporal axis (patch embedding, RoPE, head).
* `expert_schedule`: which A14B expert runs at each step of the scheduler's real timestep schedule.
* `block_statistics`, `self_attention_weights`: what the blocks do to calibration inputs.
* `initial_errors`: how close a projected student is to the teacher before training, per projection method.
* `held_out_set`, `held_out_error`: how close a (trained) student is to the teacher on its own sampling
  trajectories for prompts the student never saw.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from .flow import MAX_SEQUENCE_LENGTH, expert_timestep_range, guided_velocity, per_token_timesteps
from .viz import Table, expert_schedule_summary, plot_attention_maps, plot_expert_schedule

# Wan 2.2 expert configs (WanTransformer3DModel kwargs) of the published Diffusers checkpoints.
FULL_SIZE_EXPERTS = {
    "a14b": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "ti2v-5b": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                    out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
INIT_METHODS = ("importance", "truncate", "svd", "random")
# `initial_errors` and `held_out_set` draw their noise from seeds HELD_OUT_SEEDS + i, apart from the calibration's
# and training's.
HELD_OUT_SEEDS = 1000


# -----------------------------------------------------------------------------------------------------------
# Structure


def meta_expert(variant: str = "a14b"):
    """A full-size Wan 2.2 expert (`FULL_SIZE_EXPERTS`) on the meta device: shapes and counts, no memory."""
    from diffusers import WanTransformer3DModel

    if variant not in FULL_SIZE_EXPERTS:
        raise ValueError(f"unknown Wan variant {variant!r}: use one of {', '.join(FULL_SIZE_EXPERTS)}")
    with torch.device("meta"):  # RoPE tables too (they are buffers made in __init__)
        return WanTransformer3DModel(**FULL_SIZE_EXPERTS[variant])


def full_size_student_config(teacher_config) -> dict:
    """The student config that matches a teacher expert's size (full width and depth): projection is exact."""
    cfg = dict(teacher_config.config if hasattr(teacher_config, "config") else teacher_config)
    return {"hidden_size": cfg["num_attention_heads"] * cfg["attention_head_dim"], "depth": cfg["num_layers"],
            "num_heads": cfg["num_attention_heads"], "ffn_dim": cfg["ffn_dim"]}


def _temporal_note(name: str, module: nn.Module, patch_size: tuple) -> tuple[str, str]:
    """(has a temporal axis, what it is) for one module."""
    if isinstance(module, nn.Conv3d):
        k = tuple(module.kernel_size)
        how = "one frame = Conv2d with weight[:, :, 0]" if k[0] == 1 else f"summed over its {k[0]} frames for an image"
        return "yes", f"Conv3d kernel {k}: temporal kernel {k[0]}, {how}"
    if hasattr(module, "t_dim"):  # diffusers' WanRotaryPosEmbed
        return "yes", (f"RoPE head dim {module.attention_head_dim} = t/h/w {module.t_dim}/{module.h_dim}/"
                       f"{module.w_dim}; the t rotation is the identity at frame 0")
    if hasattr(module, "unrotated_dim"):  # Wan-Lite's 2D RoPE
        return "no", f"2D RoPE: unrotated/h/w {module.unrotated_dim}/{module.h_dim}/{module.w_dim} (Wan's layout at t=0)"
    if isinstance(module, nn.Conv2d):
        return "no", f"Conv2d kernel {tuple(module.kernel_size)}"
    if name == "proj_out" and len(patch_size) == 3:
        return "yes", f"emits p_t*p_h*p_w*C = {module.out_features} values per token, (p_t, p_h, p_w, C) order"
    if name == "proj_out":
        return "no", f"emits p_h*p_w*C = {module.out_features} values per token"
    if name == "blocks" or name.endswith("attn1"):
        return "no", f"token-wise weights; self-attention mixes all {'t*h*w' if len(patch_size) == 3 else 'h*w'} tokens"
    if name.endswith("attn2"):
        return "no", f"cross-attention to the {MAX_SEQUENCE_LENGTH} text tokens"
    return "no", ""


def module_table(transformer: nn.Module, expand: tuple[str, ...] = ("blocks.0",)) -> Table:
    """Parameters per module of a Wan expert (or Wan-Lite student) and where it has a temporal axis.

    One row per top-level module, plus the children of every module named in `expand` (and the modules on
    the way to it): the default shows the parts of the first block. Works on the meta device.
    """
    total = sum(p.numel() for p in transformer.parameters())
    patch_size = tuple(transformer.config.patch_size)
    on_path = {".".join(e.split(".")[:i]) for e in expand for i in range(1, e.count(".") + 2)}
    rows = []

    def walk(module, prefix):
        for name, child in module.named_children():
            full = prefix + name
            parent = prefix[:-1]
            if parent and parent not in expand and full not in on_path:
                continue
            params = sum(p.numel() for p in child.parameters())
            temporal, note = _temporal_note(full, child, patch_size)
            rows.append((full, type(child).__name__, params, f"{params / total:.2%}", temporal, note))
            if full in on_path:
                walk(child, full + ".")

    walk(transformer, "")
    rows.append(("total", type(transformer).__name__, total, "100.00%", "", ""))
    return Table(("module", "class", "parameters", "share", "temporal axis", "note"), rows)


def _bytes(n: int) -> str:
    unit = next((u for u in ("GiB", "MiB", "KiB") if n >= 2 ** {"GiB": 30, "MiB": 20, "KiB": 10}[u]), "B")
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[unit]
    return f"{n / scale:.3g} {unit}"


def architecture_table(models: dict[str, nn.Module]) -> Table:
    """Sizes of Wan experts / Wan-Lite students side by side, one column per model (meta device works)."""
    def describe(model):
        cfg = model.config
        params = sum(p.numel() for p in model.parameters())
        per_block = sum(p.numel() for p in model.blocks[0].parameters())
        rope = model.rope
        split = (f"{rope.t_dim}/{rope.h_dim}/{rope.w_dim}" if hasattr(rope, "t_dim")
                 else f"-/{rope.h_dim}/{rope.w_dim} ({rope.unrotated_dim} unrotated)")
        return [params, cfg.num_layers, per_block, cfg.num_attention_heads * cfg.attention_head_dim,
                f"{cfg.num_attention_heads} x {cfg.attention_head_dim}", cfg.ffn_dim, "x".join(map(str, cfg.patch_size)),
                split, _bytes(params * 2)]

    quantities = ("parameters", "blocks", "parameters per block", "width", "heads x head dim", "FFN",
                  "patch (t x h x w)", "RoPE t/h/w dims", "bf16 weights")
    columns = [describe(m) for m in models.values()]
    return Table(("", *models), [(q, *values) for q, *values in zip(quantities, *columns)])


# -----------------------------------------------------------------------------------------------------------
# Experts over the sampling schedule


@dataclass
class ExpertSchedule:
    """The teacher's sampling schedule and the expert WanPipeline runs at each step (t >= boundary: high noise)."""

    timesteps: list[float]
    sigmas: list[float]
    experts: list[str]
    guidance: list[float]
    boundary: float | None

    def table(self) -> Table:
        rows = list(zip(range(len(self.timesteps)), self.timesteps, self.sigmas, self.experts, self.guidance))
        return Table(("step", "timestep", "sigma", "expert", "guidance"), rows, self.summary())

    def summary(self) -> str:
        return expert_schedule_summary(self)

    def __str__(self) -> str:
        return self.summary()

    def plot(self, ax=None):
        """Timestep per step, coloured by expert, with the boundary as a dashed line (`viz.plot_expert_schedule`)."""
        return plot_expert_schedule(self, ax)


def expert_schedule(teacher, num_inference_steps: int = 40) -> ExpertSchedule:
    """The timesteps the teacher's own scheduler visits in `num_inference_steps` steps, and each step's expert.

    A fresh scheduler from the pipeline's config is used, so the pipeline's state is untouched.
    """
    scheduler = type(teacher.pipe.scheduler).from_config(teacher.pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    experts = [teacher.expert_for_timestep(t) for t in timesteps]
    return ExpertSchedule(timesteps=timesteps, sigmas=[float(s) for s in scheduler.sigmas[:len(timesteps)]],
                          experts=experts, guidance=[teacher.guidance_for_expert(e) for e in experts],
                          boundary=teacher.boundary_timestep)


# -----------------------------------------------------------------------------------------------------------
# What the blocks do


def _forward(transformer, calibration, batch_size: int = 4, samples: slice | None = None) -> None:
    """Run a Wan expert (5D latents) or a Wan-Lite student (4D) on calibration inputs."""
    param = transformer.patch_embedding.weight
    latents = calibration.latents if len(transformer.config.patch_size) == 3 else calibration.latents[:, :, 0]
    indices = range(calibration.latents.shape[0])[samples or slice(None)]
    for start in range(0, len(indices), batch_size):
        sl = slice(indices[start], indices[min(start + batch_size, len(indices)) - 1] + 1)
        transformer(latents[sl].to(param.device, param.dtype), calibration.timesteps[sl].to(param.device),
                    calibration.prompt_embeds[sl].to(param.device, param.dtype), return_dict=False)


@torch.no_grad()
def block_statistics(transformer, calibration, batch_size: int = 4) -> Table:
    """Per-block activation statistics of the residual stream on calibration inputs (a `Calibration`).

    rms in / out: root mean square of the stream entering / leaving the block; max |out|: its largest entry;
    update / input: mean over tokens of ||out - in|| / ||in||, how much the block rewrites the stream.
    """
    sums = [dict(sq_in=0.0, sq_out=0.0, max_out=0.0, update=0.0, tokens=0, values=0) for _ in transformer.blocks]

    def hook(i):
        def record(module, args, output):
            x, y, s = args[0].float(), output.float(), sums[i]
            s["sq_in"] += x.pow(2).sum().item()
            s["sq_out"] += y.pow(2).sum().item()
            s["max_out"] = max(s["max_out"], y.abs().max().item())
            s["update"] += ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
            s["tokens"] += x.shape[0] * x.shape[1]
            s["values"] += x.numel()
        return record

    hooks = [block.register_forward_hook(hook(i)) for i, block in enumerate(transformer.blocks)]
    try:
        _forward(transformer, calibration, batch_size)
    finally:
        for h in hooks:
            h.remove()
    rows = [(i, math.sqrt(s["sq_in"] / s["values"]), math.sqrt(s["sq_out"] / s["values"]), s["max_out"],
             s["update"] / s["tokens"]) for i, s in enumerate(sums)]
    return Table(("block", "rms in", "rms out", "max |out|", "update / input"), rows)


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on (B, N, H, d), as diffusers' WanAttnProcessor applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


@dataclass
class AttentionMaps:
    """Self-attention weights of one block on one sample: `weights` (heads, N, N), rows = queries.

    `grid` is the (height, width) of the token grid, so `weights[h, q].reshape(grid)` is where query q looks.
    """

    weights: torch.Tensor
    grid: tuple[int, int]
    block: int
    timestep: float

    def plot(self, head: int = 0, query: int | None = None):
        """The full N x N map and where one query token looks (`viz.plot_attention_maps`)."""
        return plot_attention_maps(self, head, query)


@torch.no_grad()
def self_attention_weights(transformer, calibration, block: int = 0, sample: int = 0) -> AttentionMaps:
    """softmax(q k^T / sqrt(d)) of one block's self-attention on one calibration sample, every head.

    Wan's attention processor calls fused SDPA, which never forms the weights; hooks read q and k after the
    RMS norm, and the block's rotary embedding, and the weights are computed from them here.
    """
    attn = transformer.blocks[block].attn1
    seen = {}

    def on_attention(module, args, kwargs):
        seen["rotary"] = kwargs.get("rotary_emb", args[3] if len(args) > 3 else None)

    def keep(key):
        return lambda module, args, output: seen.__setitem__(key, output.float())

    hooks = [attn.register_forward_pre_hook(on_attention, with_kwargs=True),
             attn.norm_q.register_forward_hook(keep("q")), attn.norm_k.register_forward_hook(keep("k"))]
    try:
        _forward(transformer, calibration, samples=slice(sample, sample + 1))
    finally:
        for h in hooks:
            h.remove()
    q, k = (seen[key].unflatten(2, (attn.heads, -1)) for key in ("q", "k"))  # B, N, H, d
    if seen["rotary"] is not None:
        cos, sin = (f.to(q.device) for f in seen["rotary"])
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    p_h, p_w = transformer.config.patch_size[-2:]
    grid = (calibration.latents.shape[-2] // p_h, calibration.latents.shape[-1] // p_w)
    return AttentionMaps(scores.softmax(-1)[0].cpu(), grid, block, float(calibration.timesteps[sample]))


# -----------------------------------------------------------------------------------------------------------
# Velocity error of a student


@torch.no_grad()
def student_velocity(student, latents, timesteps, prompt_embeds, per_token: bool = False) -> torch.Tensor:
    """The student's velocity on the teacher's single-frame latents (B, C, 1, H, W) -> (B, C, H, W).

    `per_token` repeats each timestep per patch, as Wan 2.2 TI2V (`teacher.expand_timesteps`) is fed.
    """
    timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
    if per_token:
        timesteps = per_token_timesteps(timesteps, latents.shape[-2:], student.config.patch_size)
    return student(latents[:, :, 0], timesteps, prompt_embeds).sample.float()


def max_velocity_error(student, teacher, calibration) -> float:
    """max |v_student - v_teacher| on calibration inputs (the teacher routes each timestep to its expert)."""
    target = teacher.velocity(calibration.latents, calibration.timesteps, calibration.prompt_embeds)[:, :, 0]
    prediction = student_velocity(student, calibration.latents, calibration.timesteps, calibration.prompt_embeds,
                                  per_token=teacher.expand_timesteps)
    return (prediction - target).abs().max().item()


def relative_mse(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """||prediction - target||^2 / ||target||^2: the velocity error as a fraction of the teacher's velocity."""
    return ((prediction - target).square().mean() / target.square().mean()).item()


@dataclass
class HeldOutSet:
    """Every point of the teacher's own sampling trajectories for held-out prompts, with its velocity there.

    Parameters:
        latents: (N, C, 1, H, W) single-frame x_t, as `student_velocity` takes them.
        timesteps: (N,) the sampler's timesteps.
        prompt_embeds: (N, L, text_dim) each point's prompt embeddings.
        velocity: (N, C, H, W) the teacher's guided velocity (the target of cfg_distill), else its conditional one.
        per_token: feed the student per-token timesteps (Wan 2.2 TI2V).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    velocity: torch.Tensor
    per_token: bool = False


@torch.no_grad()
def held_out_set(teacher, prompts: list[str], *, height: int, width: int, num_inference_steps: int = 8,
                 guided: bool = True, seed: int = 0) -> HeldOutSet:
    """The teacher samples `prompts` (its scheduler, experts and guidance, as `record_trajectories` does for
    training targets) from noise seeded apart from training's, and every step is kept: the inputs a student
    meets when it samples, on prompts it was not trained on."""
    from .data import TargetSpec, record_trajectories

    noise = torch.randn(teacher.latent_shape(len(prompts), height, width),
                        generator=torch.Generator().manual_seed(HELD_OUT_SEEDS + seed))
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    spec = TargetSpec(height=height, width=width, num_inference_steps=num_inference_steps)
    records, _ = record_trajectories(teacher, embeds, negative, noise, spec, progress=False)
    v_cond = records["v_cond"]
    velocity = guided_velocity(v_cond, records["v_uncond"], records["guidance"]) if guided else v_cond
    return HeldOutSet(records["latents"][:, :, None], records["timesteps"], embeds[records["prompt_index"]],
                      velocity, teacher.expand_timesteps)


def held_out_error(student, held_out: HeldOutSet, batch_size: int = 64) -> float:
    """The student's relative velocity MSE (`relative_mse`) over all of `held_out`."""
    predictions = [student_velocity(student, held_out.latents[i:i + batch_size], held_out.timesteps[i:i + batch_size],
                                    held_out.prompt_embeds[i:i + batch_size], per_token=held_out.per_token)
                   for i in range(0, len(held_out.timesteps), batch_size)]
    return relative_mse(torch.cat(predictions), held_out.velocity)


@dataclass
class InitialErrors:
    """Relative velocity MSE, ||v_student - v_teacher||^2 / ||v_teacher||^2, per initialisation method.

    `errors[method]` holds one value per (model, seed); "random" has several random initialisations.
    """

    errors: dict[str, list[float]]
    t_range: tuple[float, float]

    def means(self) -> dict[str, float]:
        return {m: statistics.mean(v) for m, v in self.errors.items()}

    def table(self) -> Table:
        means = self.means()
        reference = next(iter(means))
        rows = [(m, means[m], statistics.stdev(v) if len(v) > 1 else 0.0, f"{means[m] / means[reference]:.2f}x")
                for m, v in self.errors.items()]
        title = (f"initial relative velocity MSE, t in [{self.t_range[0]:.0f}, {self.t_range[1]:.0f}), "
                 f"{len(self.errors[reference])} x 4 held-out latents/prompts")
        return Table(("method", "rel. MSE mean", "std", f"vs {reference}"), rows, title)

    def __str__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def _error_inputs(teacher, seed: int, prompts: list[str], t_range: tuple[float, float]):
    """4 held-out latents, timesteps and prompts for one seed (seeded apart from the calibration's)."""
    g = torch.Generator().manual_seed(HELD_OUT_SEEDS + seed)
    latents = torch.randn(4, teacher.latent_channels, 1, 16, 16, generator=g)
    t = t_range[0] + torch.rand(4, generator=g) * (t_range[1] - t_range[0])
    text = teacher.encode_prompts([prompts[(4 * seed + i) % len(prompts)] for i in range(4)])
    return latents, t, text


@torch.no_grad()
def initial_errors(teacher, student_config, methods: tuple[str, ...] = INIT_METHODS, *, prompts: list[str] | None = None,
                   seeds: int = 8, expert: str = "low_noise", layers="uniform", calibration=None,
                   random_inits: int = 3) -> InitialErrors:
    """How far each initialisation of a (narrower) student starts from the teacher, before any training.

    Parameters:
        teacher: a `Teacher`.
        student_config: the student's config (dict, JSON path or StudentConfig).
        methods: projection width methods ("importance", "truncate", "svd") and/or "random" (fresh init).
        prompts: held-out prompts (default: the packaged prompt set); 4 per seed.
        seeds: number of held-out batches of 4 random latents at random timesteps in the expert's range.
        expert, layers, calibration: passed to `project`.
        random_inits: number of random initialisations (seeds 0..n-1) averaged for "random".
    """
    from .data import read_prompts
    from .model import WanLiteTransformer2DModel
    from .projection import project

    prompts = list(prompts or read_prompts())
    t_range = expert_timestep_range(expert, teacher.boundary_timestep)  # where the projected expert serves
    models = {}
    for method in methods:
        if method == "random":
            models[method] = [WanLiteTransformer2DModel.from_student_config(
                student_config, teacher.transformer_config(), seed=i).eval() for i in range(random_inits)]
        elif method in ("importance", "truncate", "svd"):
            models[method] = [project(teacher, student_config, layers=layers, width=method, expert=expert,
                                      calibration=calibration)[0]]
        else:
            raise ValueError(f"unknown initialisation method {method!r}: use any of {INIT_METHODS}")
    per_model = {method: [[] for _ in students] for method, students in models.items()}
    for seed in range(seeds):  # the teacher's targets once per seed, shared by every model
        latents, t, text = _error_inputs(teacher, seed, prompts, t_range)
        target = teacher.velocity(latents, t, text)[:, :, 0]
        for method, students in models.items():
            for errors, student in zip(per_model[method], students):
                prediction = student_velocity(student, latents, t, text, per_token=teacher.expand_timesteps)
                errors.append(relative_mse(prediction, target))
    errors = {method: [e for model_errors in lists for e in model_errors] for method, lists in per_model.items()}
    return InitialErrors(errors, t_range)
