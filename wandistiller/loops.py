"""distill(): the training loop, from a laptop to torchrun, with checkpoints that survive being killed.

One process or many: under `torchrun` (RANK set) every rank runs this same function; prompts for the
teacher targets are split across ranks, the student is wrapped in DDP, and rank 0 alone prints, plots and
writes. A checkpoint directory appears atomically (written under a temporary name, fsynced, renamed), so the
newest one on disk is always complete and `resume=True` continues exactly where it was written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .cache import (
    ShardedShuffleSampler, build_target_cache, open_target_cache, stream_target_cache, wait_for_files,
    write_prompt_embeddings,
)
from .data import DEFAULT_PROMPTS_PATH, TargetSpec, make_online_inputs, packaged_file, read_prompts
from .loss import DistillLoss, FeatureAdapters, NonFiniteLossError, check_finite, non_finite_message
from .model import StudentConfig, WanLiteTransformer2DModel, load_student_config, student_model_config
from .reflow_pairs import PAIRS_FILE, StudentPairs

DEFAULT_STUDENT_CONFIG = str(packaged_file("config", "student_config_small.json"))  # package data: any install


CHECKPOINT_PREFIX = "step_"
CALIBRATION_PROMPTS = 8  # the first prompts, on which a projected student's importance is measured



@dataclass
class DistillConfig:
    """Every parameter of a distillation run (the names of the original tool's flags where it had them).

    Parameters:
        teacher_path: a local Wan Diffusers folder, a hub id (read from the HF cache) or tiny, tiny-ti2v-5b,
            tiny-2.1, toy.
        teacher_device_strategy: where the teacher runs: auto, cpu, cuda (cuda:LOCAL_RANK), gpu0 (one copy for
            all ranks) or balanced (spread over the GPUs).
        teacher_dtype: the teacher's weights: float32, float16 or bfloat16.
        teacher_on_cpu: the same as teacher_device_strategy=cpu.
        guidance_scale: CFG scale of the (high-noise) expert; none: Wan 2.2's (A14B 4.0, TI2V-5B and 2.1 5.0);
            <= 1 turns CFG off.
        guidance_scale_2: CFG scale of A14B's low-noise expert; none: 3.0, or guidance_scale when that is given.
        student_config: the student's JSON file (keys in config/README.md) or a dict of its keys.
        student_init: projection (from the teacher's weights), random, or the folder of a saved student.
        projection_layers: the teacher blocks the student keeps: uniform, first_last, importance or a list of
            block indices.
        projection_width: how width is cut: importance (whole heads, neurons, channels), truncate or svd.
        projection_expert: the expert the student is projected from: high_noise, low_noise or mean (of A14B's two).
        data_path: the prompts file: .txt (UTF-8, one prompt per line, # starts a comment) or a table: .csv, .tsv,
            .json, .jsonl or .parquet (see prompt_column).
        prompt_column: the column (field) of a table data_path that holds the prompts; none: prompt.
        output_dir: the run's folder: checkpoints, student, student_ema, pipeline, samples, metrics.jsonl.
        latent_source: the training points: trajectory (the teacher's sampler), noise, renoise or images.
        images_path: the folder of images for latent_source=images.
        cache_dir: where the teacher targets are kept; none: output_dir/cache.
        cache_dtype: dtype of the cached latents and velocities: bfloat16 (half the disk) or float32.
        teacher_targets: cache (computed once, then training without the teacher) or online (the teacher
            answers every batch; needed by feature_weight).
        num_inference_steps: sampler steps of each teacher trajectory and of the sample images.
        samples_per_prompt: training points per prompt for the noise, renoise and images sources.
        trajectories_per_prompt: teacher trajectories per prompt, each from its own noise (latent_source=trajectory).
        steps_per_trajectory: keep this many of each trajectory's num_inference_steps steps in the cache, evenly
            spread from the first to the last (so over both of A14B's experts); none: every step.
        height, width: image size in pixels; none: the student config's image_size.
        num_epochs: passes over the targets.
        max_steps: stop after this many optimiser steps; none or <= 0: num_epochs decides.
        batch_size: targets per optimiser step, over all ranks together (the global batch).
        gradient_accumulation_steps: micro-batches per optimiser step.
        lr: AdamW's peak learning rate (after warm-up, then cosine decay).
        weight_decay: AdamW's weight decay.
        warmup_steps: optimiser steps of linear learning-rate warm-up.
        max_grad_norm: gradients are clipped to this norm.
        ema_decay: decay of the moving average of the student's weights, which is what is exported; 0: no EMA.
        cfg_distill: learn the teacher's guided velocity (sampling needs one forward a step), not the conditional.
        objective: what the student learns: velocity (the teacher's velocity at every recorded point) or reflow
            (rectified flow: straight paths from each teacher trajectory's noise to its final latent, for sampling
            in a few Euler steps; needs latent_source=trajectory and teacher_targets=cache; start it from a
            velocity-distilled student with student_init=<its folder>; its pipeline samples with
            FlowMatchEulerDiscreteScheduler, shift 1).
        reflow_pairs: where reflow's (noise, final latent) pairs come from: teacher (the recorded trajectories:
            trajectories_per_prompt per prompt) or student (student_init, a CFG-distilled velocity student, draws
            reflow_pairs_per_prompt noises per prompt and samples each in reflow_pair_steps steps of the teacher's
            scheduler, one forward a step, before training; kept in output_dir/reflow_pairs.safetensors for a
            resume). Many pairs per prompt let the few-step student learn the noise-to-picture map instead of
            averaging a few pairs.
        reflow_pairs_per_prompt: pairs per prompt that reflow_pairs=student draws.
        reflow_pair_steps: sampling steps of each pair reflow_pairs=student draws: the student's own full step
            count (the pairs are the pictures the few-step student learns to draw).
        reflow_sampler_steps: the step count the few-step student is trained for: reflow draws its noise levels
            from the levels its sampler visits at that count (1, 1 - 1/n, ..., 1/n, which hold those of every
            count dividing it); 0: sigma ~ U(0, 1).
        reflow_pure_noise: share of reflow's rows put at pure noise (sigma 1) instead: the first step, which lays
            out the picture.
        timestep_weighting: loss weight per noise level: none, min_snr or cosmap.
        feature_weight: weight of feature distillation on the blocks' outputs; 0: off (> 0 needs
            teacher_targets=online).
        mixed_precision: auto (bf16 on GPUs), no or bf16.
        gradient_checkpointing: recompute the blocks' activations in the backward pass, to save memory.
        distributed: fail unless started by torchrun (which alone turns data parallelism on).
        num_workers: DataLoader worker processes.
        seed: seeds the teacher's noise, the data order, a random student and training.
        checkpoint_interval: optimiser steps between checkpoints.
        keep_checkpoints: how many of the newest checkpoints are kept.
        resume: continue the run in output_dir from its last checkpoint.
        overwrite: replace a finished or stopped run in output_dir (its target cache is kept).
        save_samples: write the student's (and once the teacher's) images of the sample prompts.
        sample_prompts: the prompts of the sample images; none: the first two training prompts.
        sample_interval: epochs between sample images.
        sample_dir: where sample images go; none: output_dir/samples.
        sample_steps: sampler steps of the sample images; none: num_inference_steps.
        progress: show progress bars (rank 0 only).
        callbacks: `Callback` objects told of every step, checkpoint, sample and the end (not a CLI flag).
    """

    # teacher
    teacher_path: str = "tiny"
    teacher_device_strategy: str = "auto"
    teacher_dtype: str = "float32"
    teacher_on_cpu: bool = False
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    # student
    student_config: str | dict = DEFAULT_STUDENT_CONFIG
    student_init: str = "projection"
    projection_layers: str | list = "uniform"
    projection_width: str = "importance"
    projection_expert: str = "low_noise"
    # data and teacher targets
    data_path: str = str(DEFAULT_PROMPTS_PATH)
    prompt_column: str | None = None
    output_dir: str = "outputs/distill"
    latent_source: str = "trajectory"
    images_path: str | None = None
    cache_dir: str | None = None
    cache_dtype: str = "bfloat16"
    teacher_targets: str = "cache"
    num_inference_steps: int = 8
    samples_per_prompt: int = 4
    trajectories_per_prompt: int = 1
    steps_per_trajectory: int | None = None
    height: int | None = None
    width: int | None = None
    # optimisation
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    cfg_distill: bool = True
    objective: str = "velocity"
    reflow_pairs: str = "teacher"
    reflow_pairs_per_prompt: int = 30
    reflow_pair_steps: int = 30
    reflow_sampler_steps: int = 4
    reflow_pure_noise: float = 0.4
    timestep_weighting: str = "none"
    feature_weight: float = 0.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    distributed: bool = False
    num_workers: int = 0
    seed: int = 0
    # checkpoints
    checkpoint_interval: int = 50
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False
    # samples
    save_samples: bool = True
    sample_prompts: list | None = None
    sample_interval: int = 1
    sample_dir: str | None = None
    sample_steps: int | None = None
    progress: bool = True
    callbacks: list[Callback] = field(default_factory=list, repr=False)

    @classmethod
    def docs(cls) -> dict[str, str]:
        """Each field's description from the Parameters section above, on one line (the CLI's help)."""
        docs, names = {}, []
        for line in inspect.cleandoc(cls.__doc__).split("Parameters:", 1)[1].splitlines():
            if line.startswith("        "):  # a description continued
                for name in names:
                    docs[name] += " " + line.strip()
            elif line.strip():
                head, text = line.strip().split(": ", 1)
                names = head.split(", ")
                docs.update(dict.fromkeys(names, text))
        return docs

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "callbacks"}



@dataclass
class DistillResult:
    output_dir: Path
    student_path: Path | None
    ema_path: Path | None
    checkpoints: list
    sample_paths: list
    grid_paths: list
    metrics_path: Path
    metrics: list
    steps: int



@runtime_checkable
class Callback(Protocol):
    """What `distill()` tells an observer, on rank 0 only. Subclass it and override the hooks you need (the
    others do nothing), or write a class with all four methods (such as `viz.TrainingMonitor`). Raising in a
    hook stops the run there; the last checkpoint is kept."""

    def on_step(self, step: int, metrics: dict) -> None:
        """After optimiser step `step` (counted from 1); `metrics` is its line of metrics.jsonl."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After the checkpoint of step `step` is complete on disk at `path`."""

    def on_samples(self, epoch: int, rows: dict, prompts: list) -> None:
        """After the sample images of `epoch`: `rows` maps "teacher" (first time only) and "student" to images."""

    def on_end(self, result: DistillResult) -> None:
        """After the final student and pipeline are written."""


_CALLBACK_HOOKS = ("on_step", "on_checkpoint", "on_samples", "on_end")


class _Callbacks(Callback):
    """Every callback of a run, called in order."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def on_step(self, step: int, metrics: dict) -> None:
        for callback in self.callbacks:
            callback.on_step(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, path)

    def on_samples(self, epoch: int, rows: dict, prompts: list) -> None:
        for callback in self.callbacks:
            callback.on_samples(epoch, rows, prompts)

    def on_end(self, result: DistillResult) -> None:
        for callback in self.callbacks:
            callback.on_end(result)


def distill(config: DistillConfig | None = None, /, **params) -> DistillResult:
    """Distil the teacher into a Wan-Lite student; see `DistillConfig` for every parameter.

    Call it as `distill(batch_size=8, ...)` or `distill(DistillConfig(...))`. Returns a `DistillResult` with
    the student path, checkpoints, samples and metrics. Under torchrun every rank calls it.
    """
    cfg = _resolve_config(config, params)
    rt = _setup_distributed(cfg)
    _check(cfg, rt.world_size)
    run = _validate(cfg)  # 1. everything the config files tell, before the first teacher forward
    out = Path(cfg.output_dir)
    _claim_output_dir(out, cfg, rt)
    torch.manual_seed(cfg.seed)
    # gpu0 under torchrun: one teacher on GPU 0, held by rank 0 alone; the other ranks wait for its targets.
    teacher = _LazyTeacher(cfg, rt.is_main or not run.placement.shared)
    checkpoints = list_checkpoints(out) if cfg.resume else []
    sample_prompts = list(cfg.sample_prompts or run.prompts[:2])
    projects = cfg.student_init == "projection" and not checkpoints and rt.is_main
    targets = _prepare_targets(cfg, run, rt, teacher, sample_prompts, projects)  # 2. teacher targets
    pairs = _prepare_student_pairs(cfg, run, rt, out, targets)  # reflow_pairs='student': None otherwise
    student, report, state = _prepare_student(cfg, run, rt, teacher, checkpoints)  # 3. the student
    tr = _make_training(cfg, run, rt, student, report, state, targets)  # 4. loss, optimiser, schedule, EMA
    metrics = _prepare_metrics(out / "metrics.jsonl", tr.step, rt.is_main)
    samples = _make_samples(cfg, run, rt, out, student, targets, sample_prompts, teacher)
    if cfg.teacher_targets == "cache":
        teacher.release()  # training from the cache needs no teacher
    online = teacher.loaded if cfg.teacher_targets == "online" else None
    callbacks = _Callbacks(cfg.callbacks)
    # Training's random stream starts here, from the checkpoint or the seed, whatever the setup drew (a target cache
    # built in this process, the teacher's sample images): a resumed run continues the uninterrupted run's stream.
    if state is not None:
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.seed)
    _train(cfg, rt, tr, targets, pairs, online, out, metrics, samples, callbacks)  # 5. the train loop
    return _export(cfg, rt, out, run, tr, metrics, samples, callbacks)  # 6. student, EMA and pipeline


def record_targets(config: DistillConfig | None = None, /, **params) -> Path:
    """Only the teacher side of `distill()`: record the teacher targets into the cache (`cache_dir`, default
    output_dir/cache) and stop; returns its manifest's path. Takes `distill()`'s parameters (those of the targets
    matter: teacher, prompts, latent_source, image size, steps, cfg_distill, cache_dtype, ...; the others are only
    checked). Under torchrun, on any number of nodes, every rank records its share of the shards; an interrupted
    job resumes shard by shard; a second job writing the same cache is refused. A later `distill()` with the same
    target parameters and cache_dir trains from the cache without loading the teacher (with student_init other
    than projection, which reads the teacher's weights)."""
    cfg = _resolve_config(config, params)
    rt = _setup_distributed(cfg)
    _check(cfg, rt.world_size)
    if cfg.teacher_targets != "cache":
        raise ValueError("record_targets writes the target cache: drop teacher_targets='online' (that queries the "
                         "teacher while training instead)")
    run = _validate(cfg)
    teacher = _LazyTeacher(cfg, rt.is_main or not run.placement.shared)
    _prepare_targets(cfg, run, rt, teacher, [], projects=False)
    return run.cache_dir / "manifest.json"


# --- 1. setup and validation: everything checkable before any weights are loaded ----------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if self.world_size > 1:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which `flag` is true; every rank gets the same list."""
        if self.world_size == 1:
            return [0] if flag else []
        flags = torch.zeros(self.world_size, device=self.device)
        flags[self.rank] = float(flag)
        dist.all_reduce(flags)
        return [r for r in range(self.world_size) if flags[r] > 0]


def _setup_distributed(cfg: DistillConfig) -> _Dist:
    if "RANK" not in os.environ:
        if cfg.distributed:
            raise RuntimeError("distributed=True but this process was not started by torchrun: launch with "
                               "`torchrun --nproc_per_node=N -m wandistiller distill ... --distributed`")
        return _Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_ADDR is not: start every rank with torchrun, "
                           "e.g. `torchrun --nproc_per_node=N -m wandistiller distill ...` (not `torchrun python ...`)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if rank != 0:
        # Rank 0 alone reports: silence the loading bars diffusers and transformers draw on every rank.
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(rank, world, device)


def _resolve_config(config, params) -> DistillConfig:
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown distill parameter(s) {unknown}; see DistillConfig for the names")
    if config is None:
        return DistillConfig(**params)
    return dataclasses.replace(config, **params)



_COUNTS = ("batch_size", "num_epochs", "gradient_accumulation_steps", "num_inference_steps", "samples_per_prompt",
           "trajectories_per_prompt", "checkpoint_interval", "keep_checkpoints", "sample_interval",
           "reflow_pairs_per_prompt", "reflow_pair_steps")



OBJECTIVES = ("velocity", "reflow")
REFLOW_PAIRS = ("teacher", "student")


def _check(cfg: DistillConfig, world_size: int) -> None:
    for name in _COUNTS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
    if not cfg.lr > 0:
        raise ValueError(f"lr={cfg.lr!r} must be positive, e.g. 1e-4")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay={cfg.ema_decay!r} must be in [0, 1): 0 turns the EMA off, 0.999 is usual")
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is the global batch and must divide by the {world_size} ranks")
    if cfg.teacher_targets not in ("cache", "online"):
        raise ValueError(f"teacher_targets must be 'cache' or 'online', got {cfg.teacher_targets!r}")
    _check_objective(cfg)
    if cfg.feature_weight > 0 and cfg.teacher_targets != "online":
        raise ValueError("feature_weight > 0 needs the teacher's features at each batch: set teacher_targets='online'")
    if cfg.mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be auto, no or bf16, got {cfg.mixed_precision!r}")
    for callback in cfg.callbacks:
        missing = [hook for hook in _CALLBACK_HOOKS if not callable(getattr(callback, hook, None))]
        if missing:
            raise ValueError(f"callback {type(callback).__name__} has no {', '.join(missing)}: subclass "
                             "wandistiller.Callback (hooks you do not override do nothing)")


def _check_objective(cfg: DistillConfig) -> None:
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.reflow_pairs not in REFLOW_PAIRS:
        raise ValueError(f"reflow_pairs must be one of {', '.join(REFLOW_PAIRS)}, got {cfg.reflow_pairs!r}")
    steps = cfg.reflow_sampler_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"reflow_sampler_steps={steps!r} must be a whole number of at least 0 (0: noise levels "
                         "sigma ~ U(0, 1)), e.g. 4")
    if not 0 <= cfg.reflow_pure_noise < 1:
        raise ValueError(f"reflow_pure_noise={cfg.reflow_pure_noise!r} must be in [0, 1): the share of rows at "
                         "pure noise, e.g. 0.4")
    if cfg.objective != "reflow":
        if cfg.reflow_pairs != "teacher":
            raise ValueError(f"reflow_pairs={cfg.reflow_pairs!r} sets where reflow's pairs come from: set "
                             "objective='reflow', or drop reflow_pairs")
        return
    if cfg.reflow_pairs == "student" and cfg.student_init in ("projection", "random"):
        raise ValueError(f"reflow_pairs='student' samples its pairs with the student it starts from, and "
                         f"student_init={cfg.student_init!r} cannot draw yet: set student_init to a velocity-distilled "
                         "student's folder (e.g. 03's output_dir/distill/student_ema)")
    if cfg.latent_source != "trajectory":
        raise ValueError(f"objective='reflow' trains on the (noise, final latent) pairs of the teacher's trajectories, "
                         f"which latent_source='trajectory' alone records: set latent_source='trajectory' (got "
                         f"{cfg.latent_source!r})")
    if cfg.teacher_targets != "cache" or cfg.feature_weight > 0:
        raise ValueError("objective='reflow' trains on the recorded trajectories without the teacher: set "
                         "teacher_targets='cache' and feature_weight=0")
    if not cfg.cfg_distill:
        raise ValueError("objective='reflow' learns the final latents of the teacher's sampler, which runs with the "
                         "teacher's CFG: drop cfg_distill=False (guidance_scale=1 records unguided trajectories)")


@dataclass
class _RunInputs:
    """What the config files say, read and cross-checked before the first teacher forward."""

    prompts: list
    student_config: StudentConfig
    teacher: object  # TeacherInfo
    teacher_config: dict
    placement: object  # DevicePlan
    spec: TargetSpec
    fingerprint: str
    cache_dir: Path
    cache_mismatch: bool  # a cache of another teacher/spec/prompts that overwrite=True discards


def _validate(cfg: DistillConfig) -> _RunInputs:
    """Everything checkable without weights: prompts, student config vs teacher config, projection options, image
    size vs VAE and patch factors, teacher device placement, the target cache's origin (hours of work on A14B
    would otherwise end in a config error)."""
    from .teacher import read_teacher_info, resolve_dtype, teacher_device_plan

    prompts = read_prompts(cfg.data_path, cfg.prompt_column)
    student_cfg, sets_size = _read_student_config(cfg.student_config)
    resolve_dtype(cfg.teacher_dtype)
    info = read_teacher_info(cfg.teacher_path, cfg.guidance_scale, cfg.guidance_scale_2)
    placement = teacher_device_plan(cfg.teacher_device_strategy, cfg.teacher_on_cpu)
    if placement.shared and cfg.teacher_targets == "online":
        raise ValueError("teacher_targets='online' queries the teacher on every rank at every step, but "
                         "teacher_device_strategy='gpu0' keeps one teacher for all ranks: use 'cuda' (one teacher per "
                         "GPU) or teacher_targets='cache'")
    teacher_config = info.transformer_config("transformer")
    student_model_config(student_cfg, teacher_config)
    resuming = cfg.resume and bool(list_checkpoints(cfg.output_dir))
    if cfg.student_init == "projection" and not resuming:
        _check_projection(cfg, student_cfg, teacher_config)
    elif cfg.student_init not in ("projection", "random") and not (Path(cfg.student_init) / "config.json").is_file():
        raise FileNotFoundError(f"student_init={cfg.student_init!r} is neither 'projection', 'random' nor a saved "
                                "student directory (with config.json)")
    height, width = _image_size(cfg, student_cfg, sets_size, info.vae_scale_factor, teacher_config)
    # The cache keeps the one velocity the objective trains on (feature KD, which needs the teacher, is online only).
    spec = TargetSpec(latent_source=cfg.latent_source, height=height, width=width,
                      num_inference_steps=cfg.num_inference_steps, samples_per_prompt=cfg.samples_per_prompt,
                      trajectories_per_prompt=cfg.trajectories_per_prompt, seed=cfg.seed, images_path=cfg.images_path,
                      velocity="guided" if cfg.cfg_distill else "conditional", dtype=cfg.cache_dtype,
                      steps_per_trajectory=cfg.steps_per_trajectory)
    if spec.latent_source == "images" and not Path(spec.images_path).is_dir():
        raise FileNotFoundError(f"images_path {spec.images_path} is not a folder: pass a folder of images")
    fingerprint = info.fingerprint(cfg.teacher_dtype)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "cache"
    mismatch = False
    if cfg.teacher_targets == "cache":
        try:
            open_target_cache(cache_dir, fingerprint, spec, prompts)
        except ValueError:
            if not cfg.overwrite:
                raise
            mismatch = True
    return _RunInputs(prompts, student_cfg, info, teacher_config, placement, spec, fingerprint, cache_dir, mismatch)


def _read_student_config(config) -> tuple[StudentConfig, bool]:
    """The student config, and whether it sets image_size; a broken JSON file is named with the position."""
    from .model import _read_student_config_file

    if isinstance(config, (str, Path)):
        config = _read_student_config_file(Path(config))
    sets_size = not isinstance(config, dict) or "image_size" in config
    return load_student_config(config), sets_size


def _image_size(cfg: DistillConfig, student_cfg: StudentConfig, sets_size: bool, vae_factor: int,
                teacher_config: dict) -> tuple[int, int]:
    """(height, width): the arguments, else the student config's image_size; checked against the teacher."""
    patch = teacher_config["patch_size"][-1]
    multiple = vae_factor * patch
    largest = teacher_config.get("rope_max_seq_len", 1024) * multiple  # the teacher's RoPE covers this many patches
    if cfg.height is None and cfg.width is None and not sets_size:
        raise ValueError(f"the student config sets no image_size and no height/width was given: set image_size in the "
                         f"student config or pass height and width (multiples of {multiple}, at most {largest} px "
                         "for this teacher)")
    height, width = cfg.height or student_cfg.image_size, cfg.width or student_cfg.image_size
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple or value > largest:
            raise ValueError(f"image {name} {value} does not suit this teacher: use a multiple of {multiple} (VAE "
                             f"factor {vae_factor} x patch {patch}) of at most {largest} px (its RoPE covers "
                             f"{largest // multiple} patches per side)")
    return height, width


def _check_projection(cfg: DistillConfig, student_cfg: StudentConfig, teacher_config: dict) -> None:
    """Plan the projection on a meta-device teacher: every shape and option check, without weights."""
    from diffusers import WanTransformer3DModel

    from .projection import EXPERT_CHOICES, project

    if cfg.projection_expert not in EXPERT_CHOICES:
        raise ValueError(f"unknown projection_expert {cfg.projection_expert!r}: use one of {', '.join(EXPERT_CHOICES)}")
    with torch.device("meta"):
        meta_teacher = WanTransformer3DModel.from_config(teacher_config)
    project(meta_teacher, student_cfg, layers=cfg.projection_layers,
            width="truncate" if cfg.projection_width == "svd" else cfg.projection_width)



RUN_OUTPUTS = ("checkpoints", "student", "student_ema", "pipeline", "samples", "metrics.jsonl",
               "distill_config.json", PAIRS_FILE)



def _claim_output_dir(out: Path, cfg: DistillConfig, rt: _Dist) -> None:
    """Refuse to train over an earlier run unless told to resume it or to replace it: nothing is lost silently."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file: choose a folder (new or holding a run to resume)")
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a run ({', '.join(existing)}): pass resume=True to continue "
                                  "it, overwrite=True to replace it, or choose another output_dir")
        rt.barrier()  # every rank has looked before rank 0 deletes
        if rt.is_main:
            for name in existing:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    rt.barrier()
    out.mkdir(parents=True, exist_ok=True)



# --- 2. teacher targets ----------------------------------------------------------------------------------------


class _LazyTeacher:
    """The teacher, loaded on first call and released when the run no longer needs it. Its prompt embeddings stay
    in memory (the few a run needs besides the target cache, which stores its prompts' once)."""

    def __init__(self, cfg: DistillConfig, holds_teacher: bool = True):
        self.cfg, self.holds_teacher, self.loaded = cfg, holds_teacher, None

    def __call__(self):
        if not self.holds_teacher:
            raise RuntimeError("this rank shares rank 0's teacher (teacher_device_strategy='gpu0') and must not load one")
        if self.loaded is None:
            from .teacher import load_teacher

            cfg = self.cfg
            self.loaded = load_teacher(cfg.teacher_path, cfg.teacher_device_strategy, cfg.teacher_dtype,
                                       teacher_on_cpu=cfg.teacher_on_cpu, load_experts=False,
                                       guidance_scale=cfg.guidance_scale,
                                       guidance_scale_2=cfg.guidance_scale_2)
        return self.loaded

    def release(self) -> None:
        """Drop the teacher (its memory goes with the last reference); a later call loads it again."""
        self.loaded = None


def _prepare_targets(cfg: DistillConfig, run: _RunInputs, rt: _Dist, teacher: _LazyTeacher, sample_prompts: list,
                     projects: bool):
    """The teacher targets: from the cache (built here if missing; the teacher is loaded only to build it), or,
    for online training, the inputs the loop queries the teacher at. With overwrite=True a cache of another
    teacher, spec or prompts is discarded first, never reused. `projects`: this rank projects the student from
    the teacher (its calibration prompts are encoded with the rest)."""
    prompts, spec, cache_dir, shared = run.prompts, run.spec, run.cache_dir, run.placement.shared
    if run.cache_mismatch:
        rt.barrier()
        if rt.is_main:
            open_target_cache(cache_dir, run.fingerprint, spec, prompts, discard_mismatch=True)
        rt.barrier()
    cache_complete = (cache_dir / "manifest.json").is_file()
    rank, world_size = (0, 1) if shared else (rt.rank, rt.world_size)
    barrier = None if shared else rt.barrier
    progress = cfg.progress and rt.is_main
    if teacher.holds_teacher and (cfg.teacher_targets == "online" or not cache_complete or projects):
        # All text work first, then free the text encoder (UMT5-XXL: 5.7 B) before any expert is loaded: the
        # sample prompts and the projection's calibration prompts stay in memory, the cache's go to its text files.
        teacher().encode_prompts(sample_prompts + prompts[:CALIBRATION_PROMPTS], negative="")
        if cfg.teacher_targets == "online":
            teacher().encode_prompts(prompts)
        elif not cache_complete:
            write_prompt_embeddings(teacher(), prompts, cache_dir, spec, rank=rank, world_size=world_size,
                                    barrier=barrier, progress=progress)
        teacher().release_text_encoder()
    if cfg.teacher_targets == "online":
        return make_online_inputs(teacher(), prompts, spec, progress=progress)
    if not cache_complete:
        if teacher.holds_teacher:
            build_target_cache(teacher(), prompts, cache_dir, spec, rank=rank, world_size=world_size,
                               barrier=barrier, progress=progress)
        if shared:  # rank 0 records alone: the others wait for its manifest on disk, then together
            wait_for_files([cache_dir / "manifest.json"])
            rt.barrier()
    return stream_target_cache(cache_dir, run.fingerprint, spec, prompts)


def _prepare_student_pairs(cfg: DistillConfig, run: _RunInputs, rt: _Dist, out: Path, targets) -> StudentPairs | None:
    """reflow_pairs='student': the pairs student_init samples (rank 0, once per run; see `reflow_pairs`), else None."""
    if cfg.objective != "reflow" or cfg.reflow_pairs != "student":
        return None
    from .reflow_pairs import student_pairs

    def make_pipe():
        student = WanLiteTransformer2DModel.from_pretrained(Path(cfg.student_init)).to(rt.device).eval()
        return _sampling_pipeline(str(run.teacher.source), student, few_step=False)

    latent_shape = tuple(targets[0]["latents"].shape)  # (C, h, w), as the teacher's records have them
    settings = {"student_init": str(Path(cfg.student_init).resolve()), "per_prompt": cfg.reflow_pairs_per_prompt,
                "steps": cfg.reflow_pair_steps, "seed": cfg.seed, "prompts": len(run.prompts)}
    return student_pairs(out, settings, make_pipe, targets.embeddings, len(run.prompts), latent_shape, rt.is_main,
                         cfg.progress and rt.is_main)


# --- 3. the student --------------------------------------------------------------------------------------------


def _prepare_student(cfg: DistillConfig, run: _RunInputs, rt: _Dist, teacher: _LazyTeacher, checkpoints: list):
    """(student, projection report or None, training state or None): the student of the last checkpoint with its
    training state, else a new one (projected, random or loaded); on the training device, in train mode."""
    state = report = None
    if checkpoints:
        student, state = _load_checkpoint(checkpoints[-1])
    else:
        student, report = _build_student(cfg, run.student_config, teacher, run.teacher_config, rt.rank,
                                         run.prompts[:CALIBRATION_PROMPTS])
    student.to(rt.device).train()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student, report, state


def _build_student(cfg: DistillConfig, student_cfg: StudentConfig, teacher: _LazyTeacher, teacher_config: dict,
                   rank: int, calibration_prompts: list[str]):
    if cfg.student_init == "random":
        return WanLiteTransformer2DModel.from_student_config(student_cfg, teacher_config, seed=cfg.seed), None
    if cfg.student_init != "projection":  # a saved student (checked by _validate)
        return WanLiteTransformer2DModel.from_pretrained(Path(cfg.student_init)), None
    if rank != 0:
        # Same architecture; DDP broadcasts rank 0's projected weights when it wraps the model.
        return WanLiteTransformer2DModel.from_student_config(student_cfg, teacher_config, seed=cfg.seed), None
    from .projection import project

    return project(teacher(), student_cfg, layers=cfg.projection_layers, width=cfg.projection_width,
                   expert=cfg.projection_expert, calibration={"prompts": calibration_prompts})



# --- 4. loss, optimiser, schedule, EMA and data order -------------------------------------------------------------


@dataclass
class _Training:
    """What the train loop steps, and where it is: all of it goes into every checkpoint."""

    student: WanLiteTransformer2DModel
    model: torch.nn.Module  # the student, wrapped in DDP under torchrun
    loss_fn: DistillLoss
    pairing: dict | None  # feature KD's block map
    params: list  # the student's and the loss's (feature adapters), clipped and stepped together
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    sampler: ShardedShuffleSampler
    loader: torch.utils.data.DataLoader
    batches_per_epoch: int  # loader batches an epoch uses: steps per epoch x gradient_accumulation_steps
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state(self) -> dict:
        return _training_state(self.optimizer, self.lr_scheduler, self.ema, self.loss_fn, self.pairing, self.step,
                               self.epoch, self.batch_in_epoch)


def _make_training(cfg: DistillConfig, run: _RunInputs, rt: _Dist, student, report, state, targets) -> _Training:
    """The objective (with feature KD's block map), DDP, AdamW, the warm-up + cosine schedule, the EMA and the
    data order; a resumed run restores them from its checkpoint's training state."""
    pairing = _feature_pairing(cfg, student, run.teacher_config, report, state, rt)
    loss_fn = _make_loss(cfg, pairing, student, run.teacher_config).to(rt.device)
    model = student
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler, loader = _data_order(cfg, rt, targets)
    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(targets)} targets give no full batch of {cfg.batch_size}: lower batch_size or add "
                         "prompts")
    total_steps = cfg.num_epochs * steps_per_epoch
    if cfg.max_steps is not None and cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    from diffusers.optimization import get_cosine_schedule_with_warmup

    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, foreach=True)  # one fused update, not a loop
    tr = _Training(student, model, loss_fn, pairing, params, optimizer, lr_scheduler, ema, sampler, loader,
                   steps_per_epoch * cfg.gradient_accumulation_steps, total_steps)
    if state is not None:
        tr.step, tr.epoch, tr.batch_in_epoch = _restore_training_state(state, optimizer, lr_scheduler, ema, loss_fn,
                                                                       rt.device)
    return tr


def _data_order(cfg: DistillConfig, rt: _Dist, targets):
    """(sampler, loader): each rank's share of the shuffled targets, shard-aware (see `ShardedShuffleSampler`), in
    batches of batch_size / world_size, each record with its prompt's embeddings."""
    sampler = ShardedShuffleSampler(targets.shard_sizes, num_replicas=rt.world_size, rank=rt.rank, seed=cfg.seed)
    # Each epoch's iterator draws a seed from the loader's generator: with its own, the global RNG (checkpointed)
    # is not advanced by it, so a resumed run's RNG stream is the uninterrupted run's.
    loader = torch.utils.data.DataLoader(targets, batch_size=cfg.batch_size // rt.world_size, sampler=sampler,
                                         drop_last=True, num_workers=cfg.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    return sampler, loader


def _feature_pairing(cfg: DistillConfig, student, teacher_config: dict, report, state, rt: _Dist) -> dict | None:
    """Feature KD's student->teacher block map and teacher channels. Identical on every rank (rank 0's: only it
    has the projection report) and kept in the checkpoint, so a resumed run pairs the blocks as before."""
    if cfg.feature_weight <= 0:
        return None
    if state is not None and state.get("feature_pairing"):
        return state["feature_pairing"]
    if report is not None:
        pairing = {"depth_map": list(report.depth_map), "channels": list(report.channels)}
    else:
        from .projection import select_layers

        pairing = {"depth_map": select_layers(teacher_config["num_layers"], student.config.num_layers, "uniform"),
                   "channels": None}
    return rt.broadcast(pairing)


def _make_loss(cfg: DistillConfig, pairing: dict | None, student, teacher_config: dict) -> DistillLoss:
    if pairing is None:
        return DistillLoss(cfg_distill=cfg.cfg_distill, weighting=cfg.timestep_weighting)
    block_map = list(enumerate(pairing["depth_map"]))
    teacher_dim = teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"]
    student_dim = student.config.num_attention_heads * student.config.attention_head_dim
    adapters = FeatureAdapters(student_dim, teacher_dim, len(block_map), channels=pairing["channels"])
    return DistillLoss(feature_weight=cfg.feature_weight, cfg_distill=cfg.cfg_distill,
                       weighting=cfg.timestep_weighting, adapters=adapters, block_map=block_map)


def _training_state(optimizer, lr_scheduler, ema, loss_fn, pairing, step, epoch, batch_in_epoch) -> dict:
    return {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "loss_fn": loss_fn.state_dict(),
            "feature_pairing": pairing, "rng": torch.get_rng_state(), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch}


def _restore_training_state(state: dict, optimizer, lr_scheduler, ema, loss_fn, device) -> tuple[int, int, int]:
    """Load a checkpoint's training state onto the training `device`; returns (step, epoch, batch_in_epoch)."""
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
        ema.to(device=device)  # the shadow weights come back where torch.load put them: on the CPU
    if state.get("loss_fn"):
        loss_fn.load_state_dict(state["loss_fn"])
    return state["step"], state["epoch"], state["batch_in_epoch"]



# --- 5. the train loop -----------------------------------------------------------------------------------------


def _train(cfg: DistillConfig, rt: _Dist, tr: _Training, targets, pairs: StudentPairs | None, online, out: Path,
           metrics: list, samples, callbacks: Callback) -> None:
    """Micro-batches with gradient accumulation, one optimiser step per `gradient_accumulation_steps` of them,
    metrics and checkpoints per step, samples per `sample_interval` epochs; from wherever `tr` stands."""
    autocast = _autocast(cfg, rt.device)
    bar = tqdm(total=tr.total_steps, initial=tr.step, desc="distilling", disable=not (cfg.progress and rt.is_main))
    meter = _Meter(rt)
    while tr.step < tr.total_steps:
        # from the first batch the last checkpoint had not used: a resumed run reads none it skips
        tr.sampler.set_epoch(tr.epoch, start=tr.batch_in_epoch * tr.loader.batch_size)
        for b, batch in enumerate(tr.loader, start=tr.batch_in_epoch):
            if b >= tr.batches_per_epoch:
                break
            if cfg.objective == "reflow":
                batch = _reflow_batch(batch, targets, cfg.seed, tr.step, meter.micro, rt, pairs,
                                      sampler_steps=cfg.reflow_sampler_steps, pure_noise=cfg.reflow_pure_noise)
            parts = _micro_step(tr.model, tr.loss_fn, batch, targets, online, rt, autocast, tr.step)
            (parts["loss"] / cfg.gradient_accumulation_steps).backward()
            meter.add(parts, len(batch["timesteps"]))
            if meter.micro < cfg.gradient_accumulation_steps:
                continue
            _optimizer_step(cfg, rt, tr)
            tr.step, tr.batch_in_epoch = tr.step + 1, b + 1
            _after_step(cfg, rt, tr, out, metrics, meter.record(tr), bar, callbacks)
            if tr.step >= tr.total_steps:
                break
        finished_epoch = tr.batch_in_epoch >= tr.batches_per_epoch  # False only when max_steps ends mid-epoch
        if finished_epoch:
            tr.epoch, tr.batch_in_epoch = tr.epoch + 1, 0
        sample_due = finished_epoch and tr.epoch % cfg.sample_interval == 0
        if samples is not None and (tr.step >= tr.total_steps or sample_due):
            samples.write(tr.student, tr.epoch, callbacks)
    if samples is not None and not samples.grids:  # resumed from the last step: a kill may have cut its samples
        last_epoch = tr.epoch + 1 if tr.batch_in_epoch >= tr.batches_per_epoch else tr.epoch
        if not (samples.dir / f"epoch_{last_epoch:04d}_grid.png").is_file():
            samples.write(tr.student, last_epoch, callbacks)
    bar.close()


class _Meter:
    """Sums the loss parts of a step's micro-batches and counts the samples seen between two logged steps."""

    def __init__(self, rt: _Dist):
        self.rt, self.parts, self.micro, self.samples, self.since = rt, {}, 0, 0, time.perf_counter()

    def add(self, parts: dict, batch_size: int) -> None:
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + v.detach()
        self.micro += 1
        self.samples += batch_size * self.rt.world_size

    def record(self, tr: _Training) -> dict:
        """The step's metrics line (loss parts averaged over micro-batches and ranks); starts the next step's sums."""
        now = time.perf_counter()
        record = {"step": tr.step, "epoch": tr.epoch + tr.batch_in_epoch / tr.batches_per_epoch,
                  **{k: float(self.rt.mean(v / self.micro)) for k, v in self.parts.items()},
                  "lr": tr.lr_scheduler.get_last_lr()[0], "samples_per_s": self.samples / max(now - self.since, 1e-9)}
        self.parts, self.micro, self.samples, self.since = {}, 0, 0, now
        return record


def _optimizer_step(cfg: DistillConfig, rt: _Dist, tr: _Training) -> None:
    loss_params = list(tr.loss_fn.parameters())  # the feature adapters: outside DDP, averaged by hand
    if rt.world_size > 1 and loss_params:
        _average_gradients(loss_params, rt)  # every replica clips and steps the same adapters
    torch.nn.utils.clip_grad_norm_(tr.params, cfg.max_grad_norm)
    tr.optimizer.step()
    tr.lr_scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.ema is not None:
        tr.ema.step(tr.student.parameters())


def _after_step(cfg: DistillConfig, rt: _Dist, tr: _Training, out: Path, metrics: list, record: dict, bar,
                callbacks: Callback) -> None:
    """Log the step (rank 0) and write its checkpoint when one is due (rank 0; every rank waits for it)."""
    if rt.is_main:
        _append_metrics(out / "metrics.jsonl", record)
        metrics.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        bar.update()
        callbacks.on_step(tr.step, record)
    if tr.step % cfg.checkpoint_interval == 0 or tr.step == tr.total_steps:
        if rt.is_main:
            path = _save_checkpoint(out, tr.step, tr.student, tr.state(), cfg.keep_checkpoints)
            callbacks.on_checkpoint(tr.step, path)
        rt.barrier()


def _micro_step(model, loss_fn, batch, targets, teacher, rt: _Dist, autocast, step) -> dict:
    """The loss parts of one micro-batch: targets from the batch (cache) or from `teacher` (online)."""
    device = rt.device
    latents = batch["latents"].to(device)
    timesteps = batch["timesteps"].to(device)
    embeds = batch["prompt_embeds"].to(device)
    teacher_feats = None
    if teacher is None:
        # A cache that keeps one velocity (the guided or the conditional one, as the loss asks) gives it as both:
        # v + g (v - v) is v exactly.
        v_cond, v_uncond = (batch[k].to(device) for k in (("velocity",) * 2 if "velocity" in batch else
                                                          ("v_cond", "v_uncond")))
        guidance = batch["guidance"].to(device)
    else:
        negative = targets.negative_embeds.expand(len(latents), -1, -1)
        # each sample on its own expert; with feature KD also the teacher's block outputs
        v_cond, v_uncond, guidance, teacher_feats = teacher.query(latents, timesteps, embeds, negative,
                                                                  capture_blocks=loss_fn.feature_weight > 0)
        v_cond, v_uncond, guidance = v_cond.to(device), v_uncond.to(device), guidance.to(device)
    with autocast:
        out = model(latents, timesteps, embeds, output_hidden_states=loss_fn.feature_weight > 0)
    parts = loss_fn(out.sample.float(), v_cond, v_uncond, guidance, timestep=timesteps,
                    student_feats=out.hidden_states, teacher_feats=teacher_feats)
    _stop_if_not_finite(parts, step + 1, rt)
    return parts


_PATH_FIELDS = ("teacher_path", "student_config", "student_init", "data_path", "images_path", "output_dir",
                "cache_dir", "sample_dir")
# Names that mean the same whatever folders exist (`locate_teacher`, `_validate`): never made paths.
_KEYWORDS = {"teacher_path": {"tiny"}, "student_init": {"projection", "random"}}


def _recorded_config(cfg: DistillConfig) -> dict:
    """The run's settings as `distill_config.json` keeps them: a relative path that exists (a notebook's
    "../data/toy_prompts.txt") made absolute, so `distill(**settings)` from that file works from any folder;
    keywords (tiny, projection, random) and names that are not paths here (toy, a hub id) are kept as given."""
    record = cfg.to_json()
    for name in _PATH_FIELDS:
        value = record.get(name)
        if (isinstance(value, str) and value and value not in _KEYWORDS.get(name, ()) and not Path(value).is_absolute()
                and Path(value).exists()):
            record[name] = str(Path(value).resolve())
    return record


def _reflow_batch(batch: dict, targets, seed: int, step: int, micro: int, rt: _Dist,
                  pairs: StudentPairs | None = None, sampler_steps: int = 0, pure_noise: float = 0.0) -> dict:
    """Reflow's micro-batch: for each record's trajectory (noise z, final latent x0), the point of the straight path
    at a noise level (`loss.reflow_timesteps`) and its velocity z - x0 (the one velocity target, so the guided
    target is that velocity too). With student `pairs`, each record's pair is one of its prompt's pairs instead, drawn after
    the noise levels. Both are drawn for the global micro-batch from a generator seeded by (seed, step,
    micro-batch) alone, each rank taking its own rows as the sampler deals them: a resumed run, or one on several
    ranks, draws the same levels and pairs."""
    from .loss import reflow_targets, reflow_timesteps

    index = batch["trajectory"]
    key = hashlib.sha256(f"reflow:{seed}:{step}:{micro}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    timesteps = reflow_timesteps(len(index) * rt.world_size, generator=generator, sampler_steps=sampler_steps,
                                 pure_noise=pure_noise)
    timesteps = timesteps[rt.rank::rt.world_size]
    if pairs is None:
        noise, final = targets.reflow_pairs(index)
    else:
        choice = torch.randint(pairs.per_prompt, (len(index) * rt.world_size,), generator=generator)
        noise, final = pairs.pairs(batch["prompt_index"], choice[rt.rank::rt.world_size])
    latents, velocity = reflow_targets(final, noise, timesteps)
    kept = {key: value for key, value in batch.items() if key not in ("v_cond", "v_uncond")}
    return {**kept, "latents": latents, "timesteps": timesteps, "velocity": velocity}


def _stop_if_not_finite(parts: dict, step: int, rt: _Dist) -> None:
    """Stop every rank together on a non-finite loss: a rank that stopped alone would leave the others waiting in
    DDP's all-reduce. The ranks agree first, so all raise the same message before any bad step is applied."""
    if rt.world_size == 1:
        check_finite(parts, step)
        return
    bad = [name for name, value in parts.items() if not torch.isfinite(value.detach()).all()]
    ranks = rt.ranks_where(bool(bad))
    if ranks:
        raise NonFiniteLossError(non_finite_message(step, f"on rank{'s' if len(ranks) > 1 else ''} "
                                                          f"{', '.join(map(str, ranks))} of {rt.world_size}"))


def _average_gradients(params: list, rt: _Dist) -> None:
    """Average the gradients of parameters DDP does not own (the feature adapters) over the ranks."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = rt.mean(torch.cat([g.flatten() for g in grads]))
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def _autocast(cfg: DistillConfig, device: torch.device):
    use_bf16 = device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16")
    if cfg.mixed_precision == "bf16" and device.type != "cuda":
        warnings.warn("mixed_precision='bf16' is used on GPUs only; training in float32 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _prepare_metrics(path: Path, step: int, is_main: bool) -> list:
    """Metrics of steps up to `step` (those after it, from a killed run, are dropped so the curve continues; so is a
    last line the kill cut short). The file is rewritten under a temporary name: a kill here loses no step."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # only the last line can be cut short
        if record["step"] <= step:
            records.append(record)
    if is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, path)
    return records


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")



# --- samples ---------------------------------------------------------------------------------------------------


def _make_samples(cfg: DistillConfig, run: _RunInputs, rt: _Dist, out: Path, student, targets, sample_prompts: list,
                  teacher: _LazyTeacher):
    """The sample writer (rank 0, with save_samples), or None."""
    if not (cfg.save_samples and rt.is_main):
        return None
    embeds = _sample_embeds(targets, run.prompts, sample_prompts, teacher)
    sample_dir = Path(cfg.sample_dir) if cfg.sample_dir else out / "samples"
    return _Samples(cfg, str(run.teacher.source), student, sample_prompts, embeds, run.spec.height, run.spec.width,
                    sample_dir, teacher=teacher.loaded)


def _sampling_pipeline(teacher_source: str, student, few_step: bool):
    """A `WanLitePipeline` around `student` with the teacher's VAE and scheduler (the few-step Euler one for a
    reflow run), on the student's device, without a progress bar."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    from .pipeline import WanLitePipeline, few_step_scheduler
    from .teacher import read_model_index

    vae = AutoencoderKLWan.from_pretrained(teacher_source, subfolder="vae").eval().requires_grad_(False)
    scheduler = (few_step_scheduler() if few_step
                 else UniPCMultistepScheduler.from_pretrained(teacher_source, subfolder="scheduler"))
    expand = bool(read_model_index(Path(teacher_source)).get("expand_timesteps"))
    vae.to(next(student.parameters()).device)
    pipe = WanLitePipeline(transformer=student, vae=vae, scheduler=scheduler, expand_timesteps=expand,
                           few_step=few_step)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Samples:
    """Student (and, once, teacher) images for the sample prompts from the same fixed noise, written to `dir`."""

    def __init__(self, cfg: DistillConfig, teacher_source: str, student, prompts: list[str], embeds,
                 height: int, width: int, sample_dir: Path, teacher=None):
        self.cfg, self.prompts, self.embeds, self.dir = cfg, prompts, embeds, sample_dir
        self.paths, self.grids = [], []  # what this run wrote
        self.steps = cfg.sample_steps or cfg.num_inference_steps
        self.pipe = _sampling_pipeline(teacher_source, student, few_step=cfg.objective == "reflow")
        scale = self.pipe.vae_scale_factor
        generator = torch.Generator().manual_seed(cfg.seed + 12345)
        self.noise = torch.randn(len(prompts), self.pipe.vae.config.z_dim, height // scale, width // scale,
                                 generator=generator)
        self.teacher_images = self._teacher_images(teacher) if teacher is not None else None

    def _teacher_images(self, teacher) -> list:
        from .data import record_trajectories

        embeds, negative = teacher.encode_prompts(self.prompts, negative="")
        _, final = record_trajectories(teacher, embeds, negative, self.noise[:, :, None],
                                       TargetSpec(num_inference_steps=self.steps), progress=False)
        return self.pipe.decode_latents(final[:, :, 0])

    @torch.no_grad()
    def student_images(self) -> list:
        device = next(self.pipe.transformer.parameters()).device
        return self.pipe(prompt_embeds=self.embeds.to(device), latents=self.noise.to(device),
                         num_inference_steps=self.steps, output_type="pil").images

    def write(self, student, epoch: int, callbacks: Callback) -> None:
        """The student's images after `epoch` and a grid (under the teacher's, when there are any)."""
        from .viz import image_grid

        self.dir.mkdir(parents=True, exist_ok=True)
        was_training = student.training
        student.eval()
        images = self.student_images()
        student.train(was_training)
        for i, image in enumerate(images):
            path = self.dir / f"epoch_{epoch:04d}_sample_{i:02d}.png"
            _save_image(image, path)
            self.paths.append(path)
        rows = {"teacher": self.teacher_images, "student": images} if self.teacher_images else {"student": images}
        grid = self.dir / f"epoch_{epoch:04d}_grid.png"
        _save_image(image_grid([im for row in rows.values() for im in row], nrow=len(images)), grid)
        self.grids.append(grid)
        callbacks.on_samples(epoch, rows, self.prompts)


def _sample_embeds(targets, prompts, sample_prompts, teacher: _LazyTeacher):
    index = {p: i for i, p in enumerate(prompts)}
    if all(p in index for p in sample_prompts):
        return targets.embeddings([index[p] for p in sample_prompts])
    return teacher().encode_prompts(sample_prompts)


def _save_image(image, path: Path) -> None:
    """An image file that appears complete or not at all (written under a temporary name, then renamed)."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)


# --- checkpoints ---------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir/checkpoints`, oldest first (temporary directories are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def _save_checkpoint(output_dir: Path, step: int, student, state: dict, keep: int) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp_{final.name}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # left by a killed run: never complete, never read
        shutil.rmtree(stale)
    try:
        tmp.mkdir()
        student.save_pretrained(tmp / "student", safe_serialization=True)
        torch.save(state, tmp / "training_state.pt")
        _fsync_tree(tmp)
    except Exception as err:  # a full disk, a quota, a failing mount: say so, keep the last complete checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the last complete one, {previous[-1].name}, is intact" if previous else "there is no earlier one"
        raise RuntimeError(f"checkpoint {final.name} could not be written ({str(err).splitlines()[0]}); {kept}: free "
                           "disk space and resume with resume=True") from err
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        doomed = root / f".tmp_{old.name}"  # out of list_checkpoints before its first file goes
        os.replace(old, doomed)
        shutil.rmtree(doomed)
    return final


def _load_checkpoint(checkpoint: Path):
    """A checkpoint's student and training state, read as data only: safetensors weights and a weights-only torch
    file. A file holding other Python objects is refused, never unpickled (that could run code)."""
    import pickle

    if not (checkpoint / "student" / "diffusion_pytorch_model.safetensors").is_file():
        raise ValueError(f"checkpoint {checkpoint} has no diffusion_pytorch_model.safetensors (student weights are "
                         "read from safetensors only): move the folder away to resume from the checkpoint before it")
    try:
        state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{checkpoint / 'training_state.pt'} holds Python objects besides tensors and is refused "
                         "(unpickling them could run code): it is not a checkpoint this kit wrote; move the folder "
                         "away to resume from the checkpoint before it") from None
    return WanLiteTransformer2DModel.from_pretrained(checkpoint / "student", use_safetensors=True), state



# --- 6. export ---------------------------------------------------------------------------------------------------


def _export(cfg: DistillConfig, rt: _Dist, out: Path, run: _RunInputs, tr: _Training, metrics: list, samples,
            callbacks: Callback) -> DistillResult:
    """The final student, its EMA, the run's config and the self-contained pipeline (rank 0 writes them)."""
    student_path = ema_path = None
    if rt.is_main:
        student_path = out / "student"
        tr.student.save_pretrained(student_path, safe_serialization=True)
        if tr.ema is not None:
            ema_path = out / "student_ema"
            tr.ema.store(tr.student.parameters())
            tr.ema.copy_to(tr.student.parameters())
            tr.student.save_pretrained(ema_path, safe_serialization=True)
            tr.ema.restore(tr.student.parameters())
        (out / "distill_config.json").write_text(json.dumps(_recorded_config(cfg), indent=1, default=str))
        _export_pipeline(out, ema_path or student_path, run.teacher, cfg)
    rt.barrier()
    sample_paths, grid_paths = (samples.paths, samples.grids) if samples is not None else ([], [])
    result = DistillResult(out, student_path, ema_path, list_checkpoints(out), sample_paths, grid_paths,
                           out / "metrics.jsonl", metrics, tr.step)
    if rt.is_main:
        callbacks.on_end(result)
    return result


def _export_pipeline(out: Path, student_path: Path, teacher, cfg: DistillConfig) -> Path:
    """`out/pipeline`: the student (EMA weights when kept) with the teacher's other components, ready to sample.
    Guided targets (cfg_distill with the teacher's CFG on) make a CFG-distilled student; a reflowed student samples
    with the few-step Euler scheduler. A resumed run replaces the pipeline its earlier part wrote, as it replaces
    the student."""
    from .pipeline import PIPELINE_DIR, export_pipeline

    return export_pipeline(out / PIPELINE_DIR, student_path, teacher.source,
                           cfg_distilled=cfg.cfg_distill and teacher.guidance_scale > 1,
                           teacher_guidance_scale=teacher.guidance_scale, overwrite=cfg.resume,
                           few_step=cfg.objective == "reflow")

