"""Teacher -> student weights: exact where exactness is possible, measured where it is not.

A Wan expert becomes a Wan-Lite student in three independent steps:

* 3D -> 2D. Wan's patch embedding is a Conv3d with temporal kernel 1: on one frame it *is* a Conv2d with
  `weight[:, :, 0]` (a temporal kernel > 1 is summed over time, exact for a static image). RoPE keeps Wan's
  h/w frequencies and leaves the temporal dims unrotated (identity at frame 0). The output head keeps Wan's
  (p_h, p_w, C) order. So a student at the teacher's full width and depth reproduces it exactly.
* Depth (`layers`): which teacher block initialises each student block - `uniform`, `first_last`,
  `importance` (block influence on calibration inputs) or an explicit list of teacher block indices.
* Width (`width`): which residual channels, attention heads and FFN neurons survive - `importance` (ranked on
  calibration inputs) or the original tool's per-matrix `truncate` and `svd`, kept as baselines.

`project` returns the student and a `ProjectionReport` (what happened to every parameter, the depth map,
the kept channels and the importance scores; `viz` renders it for notebooks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .flow import MAX_SEQUENCE_LENGTH, add_noise, expert_timestep_range
from .model import WanLiteTransformer2DModel, student_model_config

EXPERT_CHOICES = ("high_noise", "low_noise", "mean")
LAYER_METHODS = ("uniform", "first_last", "importance")
WIDTH_METHODS = ("importance", "truncate", "svd")

# Short, varied prompts for calibration when the caller gives none (the teacher encodes them).
DEFAULT_CALIBRATION_PROMPTS = (
    "a red fox sitting in fresh snow, looking at the camera",
    "a bowl of ramen on a wooden table, steam rising, soft window light",
    "an aerial view of a winding river through autumn forest",
    "a portrait of an old fisherman with a weathered face, black and white",
    "a neon-lit street in the rain at night, reflections on the asphalt",
    "a glass of orange juice on a kitchen counter, morning sun",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a macro photo of a bee on a purple flower",
)


# -----------------------------------------------------------------------------------------------------------
# Calibration inputs


@dataclass
class Calibration:
    """Inputs on which the teacher is run to rank blocks, heads, neurons and channels.

    Parameters:
        latents: noisy single-frame latents, (B, C, 1, H, W) (or (B, C, H, W)).
        timesteps: (B,) flow-matching timesteps (pick them in the chosen expert's `flow.expert_timestep_range`).
        prompt_embeds: (B, L, text_dim) text embeddings (Teacher.encode_prompts).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor

    def __post_init__(self):
        if self.latents.ndim == 4:
            self.latents = self.latents[:, :, None]
        b = self.latents.shape[0]
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.float32).flatten().expand(b)
        if self.prompt_embeds.shape[0] != b:
            raise ValueError(f"calibration has {b} latents but {self.prompt_embeds.shape[0]} prompt embeddings")


def make_calibration(teacher, prompts=None, *, expert: str = "low_noise", num_samples: int = 8,
                     latent_size: int = 16, seed: int = 0) -> Calibration:
    """A small default calibration set.

    Latents are random x0 noised (`flow.add_noise`) to `num_samples` evenly spread timesteps in the expert's
    range (`flow.expert_timestep_range`). Prompts are encoded by the teacher when `teacher` is a Teacher
    (default: DEFAULT_CALIBRATION_PROMPTS); for a bare transformer the text embeddings are random (16 random
    tokens, zero-padded to MAX_SEQUENCE_LENGTH like Wan's) from the same seed.

    Parameters:
        teacher: a `Teacher` or a `WanTransformer3DModel`.
        prompts: prompts to encode (Teacher only); cycled to `num_samples`.
        expert: "high_noise", "low_noise" or "mean" - picks the timestep range.
        num_samples: calibration batch size.
        latent_size: latent height and width (16 -> 64 patches at patch 2).
        seed: seeds latents, noise and random text.
    """
    transformer = _experts(teacher, expert)[0][0]
    cfg = transformer.config
    gen = torch.Generator().manual_seed(seed)
    shape = (num_samples, cfg.in_channels, 1, latent_size, latent_size)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    lo, hi = expert_timestep_range(expert, getattr(teacher, "boundary_timestep", None))
    timesteps = lo + (torch.arange(num_samples) + 0.5) / num_samples * (hi - lo)
    latents = add_noise(x0, noise, timesteps)
    if hasattr(teacher, "encode_prompts"):
        prompts = list(prompts or DEFAULT_CALIBRATION_PROMPTS)
        prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        prompt_embeds = teacher.encode_prompts(prompts).float()
    else:
        if prompts is not None:
            raise ValueError("prompts need a Teacher to encode them; a bare transformer gets random text embeddings")
        prompt_embeds = torch.zeros(num_samples, MAX_SEQUENCE_LENGTH, cfg.text_dim)
        prompt_embeds[:, :16] = torch.randn(num_samples, 16, cfg.text_dim, generator=gen)
    return Calibration(latents, timesteps, prompt_embeds)


def _as_calibration(calibration, teacher, expert: str) -> Calibration:
    if isinstance(calibration, Calibration):
        return calibration
    if calibration is None:
        return make_calibration(teacher, expert=expert)
    if isinstance(calibration, dict):
        if "latents" in calibration:
            return Calibration(**calibration)
        return make_calibration(teacher, **{"expert": expert, **calibration})
    raise TypeError(f"calibration must be None, a Calibration or a dict, got {type(calibration).__name__}")


# -----------------------------------------------------------------------------------------------------------
# Importance on calibration inputs


@dataclass
class Importance:
    """What each part of a teacher contributes on calibration inputs (larger = more important).

    Parameters:
        block_influence: (L,) mean `1 - cos(block input, block output)` over tokens: how much a block
            changes the residual stream.
        self_heads, cross_heads: (L, H) mean norm of each head's contribution to the residual stream
            (its output through `to_out`).
        ffn_neurons: (L, F) mean |activation| x norm of the neuron's output weights.
        channels: (D,) mean square of each residual-stream channel, each layer's profile normalised to sum 1
            before averaging over the L + 1 stream positions.
        text_channels: (D,) mean square of each channel of the embedded text (what cross-attention reads).
        time_hidden, text_hidden: (D,) contribution of the hidden units of the time and text embedders.
        input_means: mean input of every nn.Linear (by module name), used to compensate removed inputs.
    """

    block_influence: torch.Tensor
    self_heads: torch.Tensor
    cross_heads: torch.Tensor
    ffn_neurons: torch.Tensor
    channels: torch.Tensor
    text_channels: torch.Tensor
    time_hidden: torch.Tensor
    text_hidden: torch.Tensor
    input_means: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The scores as lists (input_means left out: they are per-layer statistics, not scores)."""
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self) if f.name != "input_means"}

    @staticmethod
    def mean(scores: list[Importance]) -> Importance:
        """The average over experts (expert="mean")."""
        avg = lambda ts: torch.stack(ts).mean(0)
        fields = [f.name for f in dataclasses.fields(Importance) if f.name != "input_means"]
        out = {f: avg([getattr(s, f) for s in scores]) for f in fields}
        means = {k: avg([s.input_means[k] for s in scores]) for k in scores[0].input_means}
        return Importance(**out, input_means=means)


class _Accumulator:
    """Running sums of per-unit statistics, summed over tokens and batches."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, total: torch.Tensor, count: int):
        total = total.detach().double().cpu()
        self.sums[key] = self.sums.get(key, 0) + total
        self.counts[key] = self.counts.get(key, 0) + count

    def mean(self, key) -> torch.Tensor:
        return (self.sums[key] / self.counts[key]).float()


def _head_contribution(o: torch.Tensor, out_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Sum over tokens of ||W_out[:, head] @ o_head||, per head; o is the attention output (B, N, H*hd)."""
    o = o.float().flatten(0, 1).unflatten(-1, (heads, -1))  # T, H, hd
    w = out_weight.float().unflatten(1, (heads, -1))  # D, H, hd
    return torch.stack([(o[:, h] @ w[:, h].T).norm(dim=-1).sum() for h in range(heads)])


def _unit_contribution(a: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of |a_j| * ||W_out[:, j]||: each input unit's contribution to a linear layer's output."""
    a = a.float().reshape(-1, a.shape[-1])
    return a.abs().sum(0) * out_weight.float().norm(dim=0)


@torch.no_grad()
def measure_importance(transformer, calibration: Calibration, *, batch_size: int = 4) -> Importance:
    """Run a Wan transformer on calibration inputs and score its blocks, heads, neurons and channels.

    Hooks read the residual stream at every block, the attention outputs before `to_out`, the FFN
    activations and the condition embedder; nothing in the model is changed.
    """
    acc = _Accumulator()
    hooks, linears = _importance_hooks(transformer, acc)
    param = transformer.patch_embedding.weight  # the input's dtype (some modules stay float32 in bf16 models)
    try:
        for start in range(0, calibration.latents.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            transformer(hidden_states=calibration.latents[sl].to(param.device, param.dtype),
                        timestep=calibration.timesteps[sl].to(param.device),
                        encoder_hidden_states=calibration.prompt_embeds[sl].to(param.device, param.dtype),
                        return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return _importance(acc, len(transformer.blocks), linears)


def _importance_hooks(transformer, acc: _Accumulator) -> tuple[list, list[str]]:
    """Hooks that add each score's sums to `acc` as the model runs: (hooks, the names of its linear layers)."""
    blocks = transformer.blocks
    heads = transformer.config.num_attention_heads
    hooks = []

    def on_block(i):
        def hook(module, args, output):
            x, y = args[0].float(), output.float()
            tokens = x.shape[0] * x.shape[1]
            acc.add(("influence", i), (1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum(), tokens)
            acc.add(("stream", i), x.pow(2).sum((0, 1)), tokens)
            if i == len(blocks) - 1:  # the stream after the last block feeds the output head
                acc.add(("stream", i + 1), y.pow(2).sum((0, 1)), tokens)
        return hook

    def on_input(key, fn):
        def hook(module, args):
            a = args[0]
            acc.add(key, fn(a, module.weight), a.numel() // a.shape[-1])
        return hook

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(on_block(i)))
        hooks.append(block.attn1.to_out[0].register_forward_pre_hook(
            on_input(("self", i), lambda a, w: _head_contribution(a, w, heads))))
        hooks.append(block.attn2.to_out[0].register_forward_pre_hook(
            on_input(("cross", i), lambda a, w: _head_contribution(a, w, heads))))
        hooks.append(block.ffn.net[2].register_forward_pre_hook(on_input(("ffn", i), _unit_contribution)))
    embedder = transformer.condition_embedder
    hooks.append(embedder.time_embedder.linear_2.register_forward_pre_hook(on_input("time_hidden", _unit_contribution)))
    hooks.append(embedder.text_embedder.linear_2.register_forward_pre_hook(on_input("text_hidden", _unit_contribution)))
    hooks.append(embedder.text_embedder.register_forward_hook(
        lambda m, a, out: acc.add("text_channels", out.float().pow(2).sum((0, 1)), out.shape[0] * out.shape[1])))
    linears = [name for name, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        hooks.append(transformer.get_submodule(name).register_forward_pre_hook(
            on_input(("mean", name), lambda a, w: a.float().reshape(-1, a.shape[-1]).sum(0))))
    return hooks, linears


def _importance(acc: _Accumulator, num_blocks: int, linears: list[str]) -> Importance:
    """The scores: means of the sums the hooks collected."""
    stream = torch.stack([acc.mean(("stream", i)) for i in range(num_blocks + 1)])
    return Importance(
        block_influence=torch.stack([acc.mean(("influence", i)) for i in range(num_blocks)]),
        self_heads=torch.stack([acc.mean(("self", i)) for i in range(num_blocks)]),
        cross_heads=torch.stack([acc.mean(("cross", i)) for i in range(num_blocks)]),
        ffn_neurons=torch.stack([acc.mean(("ffn", i)) for i in range(num_blocks)]),
        channels=(stream / stream.sum(-1, keepdim=True)).mean(0),
        text_channels=acc.mean("text_channels"),
        time_hidden=acc.mean("time_hidden"),
        text_hidden=acc.mean("text_hidden"),
        input_means={name: acc.mean(("mean", name)) for name in linears},
    )


# -----------------------------------------------------------------------------------------------------------
# Depth and width plans


def select_layers(num_teacher_layers: int, depth: int, layers="uniform", importance: Importance | None = None) -> list[int]:
    """The teacher block index that initialises each student block.

    `uniform`: evenly spread, first and last included. `first_last`: the first ceil(depth/2) and last
    floor(depth/2) blocks (drop the middle, where blocks change the stream least in deep transformers).
    `importance`: the `depth` blocks with the largest block influence, in order. A list is used as given.
    """
    if depth > num_teacher_layers:
        raise ValueError(f"student depth {depth} exceeds the teacher's {num_teacher_layers} blocks")
    if not isinstance(layers, str):
        chosen = [int(i) for i in layers]
        if len(chosen) != depth or not all(0 <= i < num_teacher_layers for i in chosen):
            raise ValueError(f"layers={chosen} must list {depth} teacher block indices in [0, {num_teacher_layers})")
        return chosen
    if layers == "uniform":
        if depth == 1:
            return [0]
        return [round(i * (num_teacher_layers - 1) / (depth - 1)) for i in range(depth)]
    if layers == "first_last":
        head = (depth + 1) // 2
        return list(range(head)) + list(range(num_teacher_layers - (depth - head), num_teacher_layers))
    if layers == "importance":
        if importance is None:
            raise ValueError("layers='importance' needs calibration (importance scores)")
        return sorted(importance.block_influence.topk(depth).indices.tolist())
    raise ValueError(f"unknown layers method {layers!r}: use one of {LAYER_METHODS} or a list of block indices")


@dataclass
class WidthPlan:
    """Teacher indices kept by the student, per axis (sorted, so full width is the identity)."""

    channels: torch.Tensor
    text_channels: torch.Tensor
    time_hidden: torch.Tensor
    text_hidden: torch.Tensor
    self_heads: list[torch.Tensor]
    cross_heads: list[torch.Tensor]
    ffn_neurons: list[torch.Tensor]


def _top(scores: torch.Tensor | None, k: int, n: int) -> torch.Tensor:
    """The k best of n units (sorted indices); the first k when there are no scores."""
    if scores is None or k == n:
        return torch.arange(k)
    return scores.topk(k).indices.sort().values


def plan_width(teacher_cfg, student_kwargs: dict, depth_map: list[int], importance: Importance | None) -> WidthPlan:
    """Which teacher channels / heads / neurons each student axis keeps (the first ones without importance)."""
    dim_t = teacher_cfg["num_attention_heads"] * teacher_cfg["attention_head_dim"]
    dim_s = student_kwargs["num_attention_heads"] * student_kwargs["attention_head_dim"]
    heads_t, heads_s = teacher_cfg["num_attention_heads"], student_kwargs["num_attention_heads"]
    ffn_t, ffn_s = teacher_cfg["ffn_dim"], student_kwargs["ffn_dim"]

    def scores(name: str, layer: int | None = None) -> torch.Tensor | None:
        if importance is None:
            return None
        values = getattr(importance, name)
        return values if layer is None else values[layer]

    return WidthPlan(
        channels=_top(scores("channels"), dim_s, dim_t),
        text_channels=_top(scores("text_channels"), dim_s, dim_t),
        time_hidden=_top(scores("time_hidden"), dim_s, dim_t),
        text_hidden=_top(scores("text_hidden"), dim_s, dim_t),
        self_heads=[_top(scores("self_heads", t), heads_s, heads_t) for t in depth_map],
        cross_heads=[_top(scores("cross_heads", t), heads_s, heads_t) for t in depth_map],
        ffn_neurons=[_top(scores("ffn_neurons", t), ffn_s, ffn_t) for t in depth_map],
    )


def _head_dims(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _parameter_sources(depth_map: list[int], plan: WidthPlan, head_dim_t: int, head_dim_s: int, dim_t: int) -> dict:
    """student parameter name -> (teacher parameter name, per-dimension index or None for "all")."""
    c, tc = plan.channels, plan.text_channels

    def attention_rows(heads):
        if head_dim_s != head_dim_t:  # truncate/svd with another head size: the first rows, as the original tool
            return torch.arange(len(c))
        return _head_dims(heads, head_dim_t)

    six_c = torch.cat([k * dim_t + c for k in range(6)])  # time_proj rows: shift/scale/gate x2, each per channel
    outside_blocks = {  # same names in teacher and student
        "patch_embedding.weight": (c,),
        "patch_embedding.bias": (c,),
        "condition_embedder.time_embedder.linear_1.weight": (plan.time_hidden, None),
        "condition_embedder.time_embedder.linear_1.bias": (plan.time_hidden,),
        "condition_embedder.time_embedder.linear_2.weight": (c, plan.time_hidden),
        "condition_embedder.time_embedder.linear_2.bias": (c,),
        "condition_embedder.time_proj.weight": (six_c, c),
        "condition_embedder.time_proj.bias": (six_c,),
        "condition_embedder.text_embedder.linear_1.weight": (plan.text_hidden, None),
        "condition_embedder.text_embedder.linear_1.bias": (plan.text_hidden,),
        "condition_embedder.text_embedder.linear_2.weight": (tc, plan.text_hidden),
        "condition_embedder.text_embedder.linear_2.bias": (tc,),
        "proj_out.weight": (None, c),
        "proj_out.bias": (),
        "scale_shift_table": (None, None, c),
    }
    sources = {name: (name, index) for name, index in outside_blocks.items()}
    for s, t in enumerate(depth_map):
        q1, q2 = attention_rows(plan.self_heads[s]), attention_rows(plan.cross_heads[s])
        n = plan.ffn_neurons[s]
        block = {
            "scale_shift_table": (None, None, c),
            "norm2.weight": (c,), "norm2.bias": (c,),
            "ffn.net.0.proj.weight": (n, c), "ffn.net.0.proj.bias": (n,),
            "ffn.net.2.weight": (c, n), "ffn.net.2.bias": (c,),
        }
        for attn, q, kv_in in (("attn1", q1, c), ("attn2", q2, tc)):
            block.update({
                f"{attn}.to_q.weight": (q, c), f"{attn}.to_q.bias": (q,),
                f"{attn}.to_k.weight": (q, kv_in), f"{attn}.to_k.bias": (q,),
                f"{attn}.to_v.weight": (q, kv_in), f"{attn}.to_v.bias": (q,),
                f"{attn}.norm_q.weight": (q,), f"{attn}.norm_k.weight": (q,),
                f"{attn}.to_out.0.weight": (c, q), f"{attn}.to_out.0.bias": (c,),
            })
        sources.update({f"blocks.{s}.{k}": (f"blocks.{t}.{k}", idx) for k, idx in block.items()})
    return sources


# -----------------------------------------------------------------------------------------------------------
# Report


KINDS = ("copied", "selected", "projected", "fresh")


@dataclass
class ParameterRecord:
    """What the projection did to one student parameter.

    kind: "copied" (the teacher tensor, at most with its unit temporal axis dropped), "selected" (a subset of
    its rows/columns), "projected" (new values computed from it: temporal sum, expert mean, SVD, rescaling)
    or "fresh" (random initialisation). energy_kept: ||student||^2 / ||teacher source||^2 (None on meta).
    """

    name: str
    kind: str
    source: str | None
    shape: tuple[int, ...]
    source_shape: tuple[int, ...] | None
    energy_kept: float | None
    note: str = ""


@dataclass
class ProjectionReport:
    """Everything `project` decided, for reading in a notebook (`print(report)`, or the HTML table).

    Parameters:
        records: one `ParameterRecord` per student parameter.
        depth_map: teacher block index of each student block.
        channels: teacher residual channel of each student channel (for feature distillation:
            `teacher_feature[..., report.channels]` is the student feature's counterpart).
        plan: the full `WidthPlan` (heads, neurons, embedder units kept).
        importance: the calibration scores (None when not measured).
        layers, width, expert: the methods used; experts: teacher expert names the weights came from.
        student_parameters, teacher_parameters: parameter counts (one teacher expert).
        plan_only: True on the meta device - shapes and sources are real, values and data-driven choices are not.
    """

    records: list[ParameterRecord]
    depth_map: list[int]
    channels: list[int]
    plan: WidthPlan
    importance: Importance | None
    layers: str | list
    width: str
    expert: str
    experts: list[str]
    student_parameters: int
    teacher_parameters: int
    plan_only: bool = False
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of student parameter *elements* per kind."""
        out = dict.fromkeys(KINDS, 0)
        for r in self.records:
            out[r.kind] += math.prod(r.shape)
        return out

    def summary(self) -> str:
        from .viz import projection_summary

        return projection_summary(self)

    def table(self) -> str:
        """A fixed-width text table: the summary, then one row per student parameter (`viz.projection_table`)."""
        from .viz import projection_table

        return str(projection_table(self))

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        # The per-parameter table is long: the plain-text form (e.g. a notebook's text/plain) is the summary.
        return self.summary()

    def _repr_html_(self) -> str:
        from .viz import projection_table

        return projection_table(self)._repr_html_()

    def to_dict(self) -> dict:
        plan = {k: [t.tolist() for t in v] if isinstance(v, list) else v.tolist()
                for k, v in dataclasses.asdict(self.plan).items()}
        return dict(
            records=[dataclasses.asdict(r) for r in self.records], depth_map=self.depth_map,
            channels=self.channels, plan=plan, importance=self.importance.to_dict() if self.importance else None,
            layers=self.layers, width=self.width, expert=self.expert, experts=self.experts,
            student_parameters=self.student_parameters, teacher_parameters=self.teacher_parameters,
            plan_only=self.plan_only, counts=self.counts(), notes=self.notes,
        )


# -----------------------------------------------------------------------------------------------------------
# Projection


def _experts(teacher, expert: str) -> tuple[list[nn.Module], list[str]]:
    """The teacher transformer(s) the student starts from (two for expert="mean" on A14B) and their names."""
    if expert not in EXPERT_CHOICES:
        raise ValueError(f"unknown expert {expert!r}: use one of {EXPERT_CHOICES}")
    if not hasattr(teacher, "expert_for_role"):  # a bare WanTransformer3DModel
        return [teacher], ["transformer"]
    roles = ("high_noise", "low_noise") if expert == "mean" else (expert,)
    names = list(dict.fromkeys(teacher.expert_for_role(r) for r in roles))
    return [teacher.load_expert(n) for n in names], names


def _source_tensor(states: list[dict], name: str) -> torch.Tensor:
    """A teacher parameter, averaged over experts for expert="mean" (one tensor at a time: no model copy)."""
    tensors = [s[name] for s in states]
    if len(tensors) == 1:
        return tensors[0]
    return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)


def _gather(tensor: torch.Tensor, index: tuple) -> torch.Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor


def _to_2d(name: str, tensor: torch.Tensor, patch_t: int) -> tuple[torch.Tensor, str]:
    """Remove the temporal axis: exact for one frame (kernel 1) or a static clip (temporal kernel summed)."""
    if name == "patch_embedding.weight":
        if patch_t == 1:
            return tensor[:, :, 0], ""
        return tensor.sum(2), f"temporal kernel {patch_t} summed (exact for a static image)"
    if name in ("proj_out.weight", "proj_out.bias") and patch_t > 1:
        # Wan's head emits (p_t, p_h, p_w, C) per token; a single image takes the mean over the p_t frames.
        return tensor.unflatten(0, (patch_t, -1)).mean(0), f"mean over {patch_t} output frames"
    return tensor, ""


def _is_full(index: tuple, shape: tuple) -> bool:
    return all(idx is None or (len(idx) == n and bool((idx.cpu() == torch.arange(n)).all()))
               for idx, n in zip(index, shape))


def _svd_reduce(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The original tool's svd method: the teacher matrix's best rank-`rank` approximation."""
    u, s, vh = torch.linalg.svd(tensor.float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(tensor.dtype)


def _energy(student: torch.Tensor, source: torch.Tensor) -> float | None:
    if student.is_meta:
        return None
    denominator = source.double().pow(2).sum().item()
    return student.double().pow(2).sum().item() / denominator if denominator else 1.0


def _mean_compensation(name, sources, states, patch_t, input_means) -> torch.Tensor | None:
    """For a linear layer's bias: what its removed inputs contributed on average, W[:, removed] @ E[x_removed].

    Removing input units (channels, heads, neurons) drops their contribution; its calibration mean is a
    constant the bias can carry (bias compensation, as in FLAP). None when nothing was removed.
    """
    weight_name = name.removesuffix(".bias") + ".weight"
    if not name.endswith(".bias") or weight_name not in sources:
        return None
    source_weight, index = sources[weight_name]
    mean = input_means.get(source_weight.removesuffix(".weight"))  # only nn.Linear layers have one
    if mean is None or index[1] is None:
        return None
    rows, cols = index
    weight, _ = _to_2d(source_weight, _source_tensor(states, source_weight), patch_t)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[cols.to(weight.device)] = False
    if not removed.any():
        return None
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    return weight.float()[:, removed] @ mean.to(weight.device)[removed]


def _project_parameter(name, target, sources, states, width, patch_t, mean_of, input_means):
    """The value of one student parameter and its record."""
    source_name, index = sources[name]
    raw = _source_tensor(states, source_name)
    source, note = _to_2d(source_name, raw, patch_t)
    full = _is_full(index, tuple(source.shape))
    value = source
    compensation = _mean_compensation(name, sources, states, patch_t, input_means) if input_means else None
    if width == "svd" and not full and source.ndim == 2:
        value = _svd_reduce(source, min(target.shape))
        note = note or f"rank-{min(target.shape)} SVD, then cropped"
    value = _gather(value, index)
    if width == "truncate" and value.ndim == 2 and value.shape[1] < source.shape[1]:
        # The original tool's variance-preserving rescale for a reduced input width.
        value = value * math.sqrt(source.shape[1] / value.shape[1])
        note = note or "cropped, x sqrt(in_teacher / in_student)"
    if compensation is not None:
        value = value + compensation.to(value.dtype)
        note = note or "+ mean contribution of removed inputs"
    if value.shape != target.shape:
        raise ValueError(f"projected {name} has shape {tuple(value.shape)}, student needs {tuple(target.shape)}")
    kind = "projected" if note or mean_of else "copied" if full else "selected"
    if mean_of:
        note = "; ".join(filter(None, ["mean of experts", note]))
    label = f"mean({','.join(mean_of)}).{source_name}" if mean_of else source_name
    return value, ParameterRecord(name, kind, label, tuple(target.shape), tuple(raw.shape), _energy(value, source), note)


def project(teacher, student_config, *, layers="uniform", width: str = "importance", expert: str = "low_noise",
            calibration=None) -> tuple[WanLiteTransformer2DModel, ProjectionReport]:
    """Initialise a Wan-Lite student from a Wan teacher.

    Parameters:
        teacher: a `Teacher` (load_teacher) or a single `WanTransformer3DModel` (also on the meta device,
            which gives a plan: shapes, sources and counts without memory).
        student_config: dict, JSON path or `StudentConfig` (hidden_size, depth, num_heads, optional ffn_dim).
        layers: "uniform", "first_last", "importance" or a list of teacher block indices (one per student block).
        width: "importance" (whole heads, FFN neurons and one residual-channel subset, ranked on calibration
            inputs), or the original tool's "truncate" / "svd" baselines.
        expert: "high_noise", "low_noise" or "mean" (average of the two A14B experts).
        calibration: None (a small default, see `make_calibration`), a `Calibration`, a dict of Calibration
            fields, or a dict of `make_calibration` arguments (e.g. {"prompts": [...], "num_samples": 16}).
            Only measured when layers or width is "importance".

    Returns:
        (student, report): the student (float32 on the teacher's device, eval mode) and a `ProjectionReport`.
    """
    if width not in WIDTH_METHODS:
        raise ValueError(f"unknown width method {width!r}: use one of {WIDTH_METHODS}")
    transformers, names = _experts(teacher, expert)
    tcfg = dict(transformers[0].config)
    kwargs = student_model_config(student_config, tcfg)
    _check_widths(kwargs, tcfg, width)
    on_meta = transformers[0].patch_embedding.weight.is_meta
    notes = []
    narrower = any(kwargs[k] < tcfg[k] for k in ("num_attention_heads", "ffn_dim"))
    wants_importance = (width == "importance" and narrower) or layers == "importance"
    importance = None
    if wants_importance and not on_meta:
        calib = _as_calibration(calibration, teacher, expert)
        importance = Importance.mean([measure_importance(t, calib) for t in transformers])
    elif wants_importance:
        notes.append("meta device: importance-based choices need weights; this plan shows first-k placeholders")
    layer_choice = "uniform" if layers == "importance" and importance is None else layers
    depth_map = select_layers(tcfg["num_layers"], kwargs["num_layers"], layer_choice, importance)
    plan = plan_width(tcfg, kwargs, depth_map, importance if width == "importance" else None)
    student, records = _projected_student(transformers, names, kwargs, depth_map, plan, width, importance)
    report = ProjectionReport(
        records=records, depth_map=depth_map, channels=plan.channels.tolist(), plan=plan, importance=importance,
        layers=layers, width=width, expert=expert, experts=names,
        student_parameters=sum(p.numel() for p in student.parameters()),
        teacher_parameters=sum(p.numel() for p in transformers[0].parameters()),
        plan_only=on_meta, notes=notes,
    )
    return student, report


def _check_widths(kwargs: dict, tcfg: dict, width: str) -> None:
    """Projection only removes width, and importance-based width keeps whole teacher heads."""
    head_dim_t = tcfg["attention_head_dim"]
    if width == "importance" and kwargs["attention_head_dim"] != head_dim_t:
        raise ValueError(f"width='importance' keeps whole teacher heads, so the student's head dim "
                         f"(hidden_size / num_heads = {kwargs['attention_head_dim']}) must equal the teacher's "
                         f"{head_dim_t}; set num_heads = hidden_size / {head_dim_t}")
    for key in ("num_attention_heads", "attention_head_dim", "ffn_dim"):
        if kwargs[key] > tcfg[key]:
            raise ValueError(f"student {key}={kwargs[key]} exceeds the teacher's {tcfg[key]}: projection only removes width")


def _projected_student(transformers: list, names: list[str], kwargs: dict, depth_map: list[int], plan, width: str,
                       importance) -> tuple[WanLiteTransformer2DModel, list[ParameterRecord]]:
    """A new student (float32, on the teacher's device) with every parameter that has a teacher source copied or
    projected from it; the others keep their random init. Returns it and one record per parameter."""
    tcfg = dict(transformers[0].config)
    head_dim_t = tcfg["attention_head_dim"]
    with torch.device(transformers[0].patch_embedding.weight.device):  # float32, whatever the teacher's dtype
        student = WanLiteTransformer2DModel(**kwargs).eval()
    sources = _parameter_sources(depth_map, plan, head_dim_t, kwargs["attention_head_dim"],
                                 tcfg["num_attention_heads"] * head_dim_t)
    states = [dict(t.named_parameters()) for t in transformers]
    mean_of = names if len(names) > 1 else []
    input_means = importance.input_means if importance is not None and width == "importance" else None
    records = []
    with torch.no_grad():
        for name, target in student.named_parameters():
            if name not in sources:  # a student part with no teacher counterpart keeps its random init
                records.append(ParameterRecord(name, "fresh", None, tuple(target.shape), None, None))
                continue
            value, record = _project_parameter(name, target, sources, states, width, tcfg["patch_size"][0], mean_of,
                                               input_means)
            target.copy_(value.float())
            records.append(record)
    return student, records
