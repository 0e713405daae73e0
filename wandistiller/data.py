"""Prompts and training data for distillation: prompt files, the (x_t, t) points of each latent source, and the
teacher's velocities there. The cache that keeps them on disk is `wandistiller.cache`.

Prompt tables (.csv, .tsv, .jsonl, .parquet) are read with pyarrow: one well-kept library reads all of these
formats, column by column (only the prompts' column is converted), fast on 100k+ rows, and without pandas."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .flow import add_noise, guided_velocity, scheduler_shift


def packaged_file(*parts: str) -> Path:
    """A file shipped inside the package: `packaged_file("config", "student_config.json")`, `("data", ...)` or
    `("notebooks", ...)` - the repository's folders of those names, found in any install (importlib.resources)."""
    return Path(str(resources.files(__package__).joinpath("assets", *parts))).resolve()


DEFAULT_PROMPTS_PATH = packaged_file("data", "static_prompts.txt")

PROMPT_TABLE_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_SHOWN_ROWS = 5  # an error names the first few bad rows


def read_prompts(path: str | Path = DEFAULT_PROMPTS_PATH, column: str | None = None) -> list[str]:
    """The prompts in `path`, stripped of surrounding whitespace.

    A `.txt` file (or one without an extension) is UTF-8 text, one prompt per line; blank lines and `#` comments
    are skipped. A table holds the prompts in its column (field) `column`, by default `prompt`: `.csv` or `.tsv`
    with a header row, `.jsonl` (one JSON object per line), `.json` (an array of objects, or of strings, which are
    the prompts themselves) or `.parquet`. A table's empty or null prompts are an error, not skipped: dropping
    training prompts silently would change a run unseen.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist: pass data_path=<a UTF-8 text file, one prompt "
                                f"per line, or a table: {', '.join(PROMPT_TABLE_FORMATS)}>")
    suffix = path.suffix.lower()
    if suffix in ("", ".txt"):
        if column is not None:
            raise ValueError(f"prompt_column={column!r} names a column, but prompts file {path} is text, one prompt per "
                             f"line, without columns: drop --prompt_column (it is for {', '.join(PROMPT_TABLE_FORMATS)} files)")
        return _read_text_prompts(path)
    if suffix not in PROMPT_TABLE_FORMATS:
        raise ValueError(f"prompts file {path} has an unknown extension {path.suffix!r}: use .txt (one prompt per line) "
                         f"or a table: {', '.join(PROMPT_TABLE_FORMATS)}")
    named, column = column is not None, "prompt" if column is None else column
    if suffix != ".parquet":
        _check_utf8(path)
    if suffix == ".json":
        return _checked_prompts(path, *_read_json(path, column, named))
    reader = {".csv": _read_csv, ".tsv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix]
    return _checked_prompts(path, *reader(path, column))


def _read_text_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not valid UTF-8 (byte {err.start}): re-save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts: write one prompt per line (lines starting with # are comments)")
    return prompts


def _check_utf8(path: Path) -> None:
    """Raise, naming the first bad byte and its line, unless the file is UTF-8 (read in 1 MiB chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with path.open("rb") as file:
        for chunk in [*iter(lambda: file.read(1 << 20), b""), b""]:
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                line = lines + (pending + chunk)[:err.start].count(b"\n") + 1
                raise ValueError(f"prompts file {path} is not valid UTF-8 (byte {offset - len(pending) + err.start}, "
                                 f"line {line}): re-save it as UTF-8") from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _checked_prompts(path: Path, values: list, where: str, unit: str, numbers: list[int] | None = None) -> list[str]:
    """`values` as prompts, stripped; every one must be non-empty text. `where` names the column in messages,
    `numbers` are the values' `unit` numbers (line numbers of a .jsonl file; by default 1, 2, ...)."""
    numbers = numbers or range(1, len(values) + 1)

    def listed(bad: list[int]) -> str:
        shown = ", ".join(str(numbers[i]) for i in bad[:_SHOWN_ROWS])
        more = f" and {len(bad) - _SHOWN_ROWS} more" if len(bad) > _SHOWN_ROWS else ""
        return f"{unit}{'s' if len(bad) > 1 else ''} {shown}{more}"

    not_text = [i for i, value in enumerate(values) if value is not None and not isinstance(value, str)]
    if not_text:
        first = values[not_text[0]]
        raise ValueError(f"prompts file {path}: {where} holds {len(not_text)} value(s) that are not text ({listed(not_text)}; "
                         f"the first is {type(first).__name__} {first!r:.40}): write every prompt as a string, or name "
                         "the text column with --prompt_column")
    empty = [i for i, value in enumerate(values) if value is None or not value.strip()]
    if empty:
        raise ValueError(f"prompts file {path}: {where} has {len(empty)} empty or null prompt(s) ({listed(empty)}): "
                         f"remove those {unit}s or fill them in")
    if not values:
        raise ValueError(f"prompts file {path} has no prompts: {where} has no {unit}s")
    return [value.strip() for value in values]


def _no_column(path: Path, column: str, names: list[str]) -> ValueError:
    found = f"its columns are {', '.join(map(repr, names))}" if names else "it has no columns"
    return ValueError(f"prompts file {path} has no column {column!r}: {found}; name the one holding the prompts with "
                      "--prompt_column")


def _column_of(path: Path, schema, column: str) -> None:
    """Raise unless `schema` (pyarrow) has exactly one column named `column`."""
    count = len(schema.get_all_field_indices(column))
    if count == 0:
        raise _no_column(path, column, schema.names)
    if count > 1:
        raise ValueError(f"prompts file {path} has {count} columns named {column!r}: rename all but the prompts' column")


def _first_line(err: Exception, limit: int = 100) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _read_csv(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.csv

    kind = path.suffix.lower()[1:].upper()
    try:  # the prompts' column as text whatever it holds (a prompt "1984" is not a number)
        table = pyarrow.csv.read_csv(
            path, parse_options=pyarrow.csv.ParseOptions(delimiter="\t" if kind == "TSV" else ",", newlines_in_values=True),
            convert_options=pyarrow.csv.ConvertOptions(column_types={column: pa.string()}))
    except pa.ArrowInvalid as err:
        if str(err).startswith("Empty CSV file"):
            raise ValueError(f"prompts file {path} is empty: write a header row naming the columns (one of them "
                             f"{column!r}), then one row per prompt") from None
        raise ValueError(f"prompts file {path} is not a valid {kind} table ({_first_line(err)}): fix the file; a cell "
                         "holding the delimiter, a quote or a line break goes in double quotes, a quote inside doubled") from None
    _column_of(path, table.schema, column)
    return table.column(column).to_pylist(), f"column {column!r}", "data row"


def _read_parquet(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.parquet

    try:
        file = pyarrow.parquet.ParquetFile(path)
        _column_of(path, file.schema_arrow, column)
        values = file.read(columns=[column]).column(0).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"prompts file {path} is not a readable Parquet file ({_first_line(err)}): write it again, "
                         "e.g. with pyarrow.parquet.write_table") from None
    return values, f"column {column!r}", "row"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _object_field(path: Path, objects, column: str, unit: str):
    """The field `column` of each (number, object) in `objects`: (values, where, unit, numbers)."""
    values, numbers, keys = [], [], {}
    for number, row in objects:
        if not isinstance(row, dict):
            raise ValueError(f"prompts file {path}: {unit} {number} is a JSON {_json_type(row)}, not an object: write "
                             f'one object per {unit}, such as {{"{column}": "a red fox in the snow"}}')
        keys.update(dict.fromkeys(row))
        values.append(row.get(column))
        numbers.append(number)
    if values and column not in keys:
        raise _no_column(path, column, list(keys))
    return values, f"field {column!r}", unit, numbers


def _read_json(path: Path, column: str, named: bool):
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"prompts file {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                         "fix the file (a file of one JSON object per line is a .jsonl file)") from None
    if not isinstance(data, list):
        raise ValueError(f"prompts file {path} holds a JSON {_json_type(data)}, not an array: write "
                         f'[{{"{column}": "a prompt"}}, ...] or ["a prompt", ...]')
    if data and not isinstance(data[0], dict):  # an array of prompts
        if named:
            raise ValueError(f"prompt_column={column!r} names a field, but prompts file {path} is an array of prompts "
                             "without fields: drop --prompt_column")
        return data, "its array", "item"
    return _object_field(path, enumerate(data, 1), column, "item")


def _read_jsonl(path: Path, column: str):
    """pyarrow reads a sound file, converting the prompts' field alone; a file it refuses, or with a missing or
    empty prompt, is read again line by line to name the line at fault."""
    import json

    import pyarrow as pa
    import pyarrow.json

    options = pyarrow.json.ParseOptions(explicit_schema=pa.schema([(column, pa.string())]),
                                        unexpected_field_behavior="ignore")
    try:
        values = pyarrow.json.read_json(path, parse_options=options).column(column).to_pylist()
        if values and all(value and value.strip() for value in values):
            return values, f"field {column!r}", "line"
    except pa.ArrowException:
        pass

    def objects():
        with path.open(encoding="utf-8-sig") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"prompts file {path}: line {number} is not valid JSON ({err.msg}, column "
                                     f"{err.colno}): fix that line; a .jsonl file holds one JSON object per line") from None

    return _object_field(path, objects(), column, "line")


# --- teacher targets --------------------------------------------------------------------------------------
#
# A target is one (x_t, t, prompt) point with the teacher's conditional and unconditional velocity there and
# the guidance scale of the expert that produced them. Targets are student-independent, so they are computed
# once and kept on disk (`wandistiller.cache`), and training can run from them without the teacher.

LATENT_SOURCES = ("trajectory", "noise", "renoise", "images")
# Trajectory targets also keep, once per trajectory, the clean latent the teacher's sampler ended at (row r is the
# trajectory with id r = prompt_index * trajectories_per_prompt + j, which each record names in "trajectory"): with
# the noise it started from (its first record's latents) it is the (noise, x0) pair that reflow trains on.
TRAJECTORY_TABLE = ("final_latents", "final_prompt_index")
# What a target keeps of the teacher's answer: the guided velocity v_u + g (v_c - v_u) (what cfg_distill trains on),
# the conditional one (what it trains on without cfg_distill), or both with each record's guidance scale.
VELOCITY_TARGETS = ("guided", "conditional", "both")
# Tensors of latent size (each C x h x w a record), stored in TargetSpec.dtype; the rest keeps its own dtype.
LATENT_KEYS = ("latents", "velocity", "v_cond", "v_uncond", "final_latents")
CACHE_DTYPES = ("bfloat16", "float32")


@dataclass
class TargetSpec:
    """Everything that decides which targets a cache holds (recorded in its manifest).

    `velocity` is what a target keeps of the teacher's answer (`VELOCITY_TARGETS`: one tensor for "guided" or
    "conditional", v_cond and v_uncond for "both"); `dtype` the dtype of its latent-sized tensors (`LATENT_KEYS`);
    `steps_per_trajectory` keeps k of a trajectory's steps, evenly spread from its first to its last (so over both
    of A14B's experts, and always with the first, whose latents are the trajectory's noise); None keeps them all.
    """

    latent_source: str = "trajectory"
    height: int = 64
    width: int = 64
    num_inference_steps: int = 8
    samples_per_prompt: int = 4
    trajectories_per_prompt: int = 1
    seed: int = 0
    images_path: str | None = None
    shard_prompts: int = 8
    velocity: str = "guided"
    dtype: str = "bfloat16"
    steps_per_trajectory: int | None = None

    def __post_init__(self):
        if self.latent_source not in LATENT_SOURCES:
            raise ValueError(f"unknown latent_source {self.latent_source!r}: use one of {', '.join(LATENT_SOURCES)}")
        if self.latent_source == "images" and not self.images_path:
            raise ValueError("latent_source='images' needs images_path=<a folder of images>")
        if self.trajectories_per_prompt != 1 and self.latent_source != "trajectory":
            raise ValueError(f"trajectories_per_prompt={self.trajectories_per_prompt} applies to latent_source="
                             f"'trajectory' only: use samples_per_prompt for {self.latent_source!r}")
        if self.velocity not in VELOCITY_TARGETS:
            raise ValueError(f"unknown velocity target {self.velocity!r}: use one of {', '.join(VELOCITY_TARGETS)}")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype={self.dtype!r} is not a cache dtype: use bfloat16 (half the bytes) or float32")
        k = self.steps_per_trajectory
        if k is not None:
            if self.latent_source != "trajectory":
                raise ValueError(f"steps_per_trajectory={k} applies to latent_source='trajectory' only: drop it (or "
                                 f"lower samples_per_prompt for {self.latent_source!r})")
            if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= self.num_inference_steps:
                raise ValueError(f"steps_per_trajectory={k!r} must be a whole number from 2 (the first and the last "
                                 f"step) to num_inference_steps={self.num_inference_steps}, or None for every step")

    def kept_steps(self) -> list[int]:
        """The indices of the sampler steps a trajectory keeps (`steps_per_trajectory`, evenly spread)."""
        n, k = self.num_inference_steps, self.steps_per_trajectory
        if k is None:
            return list(range(n))
        return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().tolist()


class TargetSet(torch.utils.data.Dataset):
    """Targets in memory: per-sample tensors plus the tables they index into: prompt embeddings (`prompt_index`)
    and, for trajectory targets, each trajectory's final latents (`trajectory`, see `TRAJECTORY_TABLE`). An item
    is a record with its prompt's embeddings; `shard_sizes` (records per cache shard, in order) shapes the data
    order as it does for the cache read from disk (`cache.TargetShards`), so both train alike."""

    def __init__(self, tensors: dict, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor,
                 shard_sizes: list[int] | None = None):
        self.tensors = {key: value for key, value in tensors.items() if key not in TRAJECTORY_TABLE}
        self.trajectories = {key: tensors[key] for key in TRAJECTORY_TABLE if key in tensors}
        self.prompt_embeds = prompt_embeds
        self.negative_embeds = negative_embeds
        self.shard_sizes = shard_sizes or [len(self)]
        self._pairs = None

    def embeddings(self, prompt_indices) -> torch.Tensor:
        """The zero-padded embeddings (B, 512, D) of the prompts `prompt_indices`."""
        return self.prompt_embeds[prompt_indices]

    def reflow_pairs(self, trajectories: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, final) of the trajectories `trajectories` (ids, as the records' `trajectory`; None: all, in id
        order): the noise the teacher's sampler started from (the latents of the trajectory's first,
        highest-timestep record, which are that noise itself) and the clean latent it ended at, (N, C, H, W) each."""
        if self._pairs is None:
            if "trajectory" not in self.tensors or "final_latents" not in self.trajectories:
                raise ValueError("these targets hold no teacher trajectories (noise, final latents): reflow needs "
                                 "latent_source='trajectory'")
            t = self.tensors
            final = self.trajectories["final_latents"]
            rows = trajectory_starts(t["trajectory"], t["timesteps"], t["prompt_index"],
                                     self.trajectories["final_prompt_index"])
            self._pairs = t["latents"][rows].to(final.dtype), final
        noise, final = self._pairs
        return (noise, final) if trajectories is None else (noise[trajectories], final[trajectories])

    def __len__(self) -> int:
        return len(self.tensors["timesteps"])

    def __getitem__(self, index: int) -> dict:
        item = {key: value[index] for key, value in self.tensors.items()}
        return dict(item, prompt_embeds=self.prompt_embeds[item["prompt_index"]])


def trajectory_starts(trajectory: torch.Tensor, timesteps: torch.Tensor, prompt_index: torch.Tensor,
                      final_prompt_index: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The record row of the first (highest-timestep) step of each of the trajectories `first`, `first + 1`, ...,
    one per row of the trajectory table (`final_prompt_index`), given the records' trajectory ids, timesteps and
    prompts. Raises unless every record belongs to a trajectory of its own prompt and every trajectory has exactly
    one first step."""
    local = trajectory - first
    count = len(final_prompt_index)
    fits = bool(((local >= 0) & (local < count)).all())
    if fits:
        top = torch.full((count,), -torch.inf, dtype=timesteps.dtype).scatter_reduce(0, local, timesteps, "amax")
        starts = torch.nonzero(timesteps == top[local]).flatten()
        fits = (torch.equal(final_prompt_index[local], prompt_index)
                and torch.equal(torch.sort(local[starts]).values, torch.arange(count)))
    if not fits:
        raise ValueError("the target cache's trajectories do not fit together (a record of another prompt's "
                         "trajectory, or a trajectory without its first step): rebuild it with overwrite=True")
    rows = torch.empty(count, dtype=torch.long)
    rows[local[starts]] = starts
    return rows


def _prompt_noise(teacher, spec: TargetSpec, prompt_index: int, sample: int = 0) -> torch.Tensor:
    """Noise for one prompt, a function of (seed, prompt, sample) only, so every rank and rerun agrees."""
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + prompt_index * 1009 + sample)
    return torch.randn(teacher.latent_shape(1, spec.height, spec.width), generator=generator)


@torch.no_grad()
def record_trajectories(teacher, embeds, negative, noise, spec: TargetSpec, *, batch_size: int = 8, progress=True):
    """Run the teacher's own sampler from `noise` and record every (x_t, t, v_cond, v_uncond) on the way (at the
    steps `spec.kept_steps()` names: all of them unless `spec.steps_per_trajectory` is set).

    Expert by expert: every trajectory's high-noise steps run with only that expert resident, then the
    low-noise steps with only the other, so one 14B expert is in memory at a time. The sampler (a copy of the
    pipeline's scheduler per batch) and CFG are WanPipeline's, so the final latents equal the pipeline's.
    Returns (records: dict of tensors with prompt-local `prompt_index`, final latents (B, C, 1, H, W)).
    """
    import copy

    scheduler = copy.deepcopy(teacher.pipe.scheduler)
    scheduler.set_timesteps(spec.num_inference_steps)
    timesteps = scheduler.timesteps
    recorded = {float(timesteps[i]) for i in spec.kept_steps()}
    chunks = []
    for start in range(0, len(noise), batch_size):
        sched = copy.deepcopy(scheduler)
        sched.set_begin_index(0)
        chunks.append({"index": torch.arange(start, min(start + batch_size, len(noise))),
                       "latents": noise[start:start + batch_size].clone(), "scheduler": sched})
    records = []
    experts = [teacher.expert_for_timestep(t) for t in timesteps]  # raises for a step no expert takes
    phases = [(name, [t for t, e in zip(timesteps, experts) if e == name]) for name in teacher.expert_names]
    total = sum(len(steps) for _, steps in phases) * len(chunks)
    bar = tqdm(total=total, desc="recording teacher trajectories", disable=not progress, leave=False)
    for name, steps in phases:
        if not steps:
            continue
        with teacher.only_expert(name):
            g = teacher.guidance_for_expert(name)
            for chunk in chunks:
                idx, sched = chunk["index"], chunk["scheduler"]
                for t in steps:
                    x_t = chunk["latents"]
                    x, t_batch = x_t[:, :, 0], t.float().expand(len(idx))
                    out = teacher.query(x, t_batch, embeds[idx], negative[idx])
                    if float(t) in recorded:
                        records.append({"latents": x.clone(), "timesteps": t_batch.clone(), "prompt_index": idx,
                                        "v_cond": out.v_cond, "v_uncond": out.v_uncond, "guidance": out.guidance})
                    velocity = guided_velocity(out.v_cond, out.v_uncond, g)[:, :, None]
                    chunk["latents"] = sched.step(velocity, t, x_t, return_dict=False)[0]
                    bar.update()
    bar.close()
    final = torch.cat([chunk["latents"] for chunk in chunks])
    return concat_records(records), final


@torch.no_grad()
def query_targets(teacher, latents, timesteps, embeds, negative, *, batch_size: int = 8, progress=True) -> dict:
    """Teacher velocities at given points (latents (N, C, H, W)), expert by expert (one resident at a time)."""
    v_cond = torch.empty_like(latents)
    v_uncond = torch.empty_like(latents)
    guidance = torch.empty(len(latents))
    bar = tqdm(total=len(latents), desc="querying teacher", disable=not progress, leave=False)
    for name, idx in teacher.split_by_expert(timesteps):
        with teacher.only_expert(name):
            for part in idx.split(batch_size):
                out = teacher.query(latents[part], timesteps[part], embeds[part], negative[part])
                v_cond[part], v_uncond[part], guidance[part] = out.v_cond, out.v_uncond, out.guidance
                bar.update(len(part))
    bar.close()
    return {"v_cond": v_cond, "v_uncond": v_uncond, "guidance": guidance}


def _random_timesteps(spec: TargetSpec, prompt_index: int, count: int, shift: float) -> torch.Tensor:
    from .loss import sample_timesteps

    generator = torch.Generator().manual_seed(spec.seed * 7919 + prompt_index)
    return sample_timesteps(count, generator=generator, shift=shift)


def load_images(folder: str | Path, height: int, width: int) -> torch.Tensor:
    """All images in `folder`, centre-cropped and resized to height x width, as (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if not files:
        raise ValueError(f"no images (.png/.jpg/.jpeg/.webp/.bmp) found in {folder}: pass images_path=<a folder of images>")
    arrays = [np.asarray(ImageOps.fit(Image.open(f).convert("RGB"), (width, height)), dtype=np.float32) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def make_inputs(teacher, spec: TargetSpec, prompt_indices: list[int], embeds, negative, *, progress=True) -> dict:
    """The (x_t, t, prompt) points of `spec.latent_source` for the given prompts (no velocities yet),
    except for `trajectory`, whose points come with their velocities since the sampler produces both."""
    if spec.latent_source == "trajectory":  # trajectory j of a prompt starts from its noise sample j
        k = spec.trajectories_per_prompt
        noise = torch.cat([_prompt_noise(teacher, spec, i, j) for i in prompt_indices for j in range(k)])
        records, final = record_trajectories(teacher, embeds.repeat_interleave(k, 0),
                                             negative.repeat_interleave(k, 0), noise, spec, progress=progress)
        prompts = torch.tensor(prompt_indices).repeat_interleave(k)  # of each trajectory
        ids = prompts * k + torch.arange(len(prompts)) % k  # global: the same on every rank and in every shard
        local = records["prompt_index"]  # the record's row in `noise`
        records.update(prompt_index=prompts[local], trajectory=ids[local], final_latents=final[:, :, 0],
                       final_prompt_index=prompts)
        return records
    noise = torch.cat([_prompt_noise(teacher, spec, i) for i in prompt_indices])
    k = spec.samples_per_prompt
    shift = scheduler_shift(teacher.pipe.scheduler.config)
    timesteps = torch.cat([_random_timesteps(spec, i, k, shift) for i in prompt_indices])
    eps = torch.cat([_prompt_noise(teacher, spec, i, sample) for i in prompt_indices for sample in range(1, k + 1)])[:, :, 0]
    prompt_index = torch.tensor(prompt_indices).repeat_interleave(k)
    if spec.latent_source == "noise":
        # The original tool's inputs: pure noise presented at an arbitrary timestep.
        return {"latents": eps, "timesteps": timesteps, "prompt_index": prompt_index}
    if spec.latent_source == "renoise":
        _, final = record_trajectories(teacher, embeds, negative, noise, spec, progress=progress)
        x0 = final[:, :, 0].repeat_interleave(k, dim=0)
    else:
        images = load_images(spec.images_path, spec.height, spec.width)
        x0 = torch.cat([teacher.encode_images(images[[i % len(images)]]) for i in prompt_index.tolist()])[:, :, 0]
    return {"latents": add_noise(x0, eps, timesteps), "timesteps": timesteps, "prompt_index": prompt_index}


def compute_targets(teacher, spec: TargetSpec, prompt_indices: list[int], embeds, negative, *, progress=True) -> dict:
    """Inputs and teacher velocities for the prompts `prompt_indices`, whose embeddings are `embeds` (one row
    each, in that order), keeping the velocity `spec.velocity` names."""
    neg = negative.expand(len(prompt_indices), -1, -1)
    inputs = make_inputs(teacher, spec, prompt_indices, embeds, neg, progress=progress)
    if "v_cond" not in inputs:
        local = {p: j for j, p in enumerate(prompt_indices)}
        rows = torch.tensor([local[p] for p in inputs["prompt_index"].tolist()], dtype=torch.long)
        inputs.update(query_targets(teacher, inputs["latents"], inputs["timesteps"], embeds[rows], neg[rows],
                                    progress=progress))
    return kept_velocity(inputs, spec.velocity)


def kept_velocity(targets: dict, velocity: str) -> dict:
    """`targets` with the teacher's answer reduced to what `velocity` (`VELOCITY_TARGETS`) keeps: a single
    `velocity` tensor (the guided or the conditional one), or `v_cond` and `v_uncond` as they are."""
    if velocity == "both":
        return targets
    targets = dict(targets)
    v_cond, v_uncond = targets.pop("v_cond"), targets.pop("v_uncond")
    targets["velocity"] = v_cond if velocity == "conditional" else guided_velocity(v_cond, v_uncond, targets["guidance"])
    return targets


def concat_records(records: list[dict]) -> dict:
    """One dict of tensors from a list of dicts with the same keys (concatenated along the batch)."""
    return {key: torch.cat([r[key] for r in records]) for key in records[0]}


def make_online_inputs(teacher, prompts: list[str], spec: TargetSpec, *, progress=True) -> TargetSet:
    """Inputs for online training (the loop queries the teacher per batch). Trajectory inputs still come from
    the teacher's sampler; their recorded velocities are dropped so that the loop's live query is the target."""
    embeds, negative = teacher.encode_prompts(prompts, negative="")
    inputs = make_inputs(teacher, spec, list(range(len(prompts))), embeds, negative, progress=progress)
    inputs = {k: inputs[k] for k in ("latents", "timesteps", "prompt_index")}
    return TargetSet(inputs, embeds, negative[:1])

