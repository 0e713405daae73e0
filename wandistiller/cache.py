"""The teacher target cache: teacher velocities at the training points, kept on disk as safetensors shards.

Every reader and writer opens a cache through `open_target_cache`, which checks that it was made with this
teacher (`Teacher.fingerprint`), these target settings (`TargetSpec`) and these prompts. Building is resumable
and split across ranks. A complete cache is read without any teacher weights: streamed from disk for training
(`stream_target_cache`, in `ShardedShuffleSampler` order), or all into memory (`load_target_cache`).

Layout, one pair of files per `spec.shard_prompts` prompts:
- `text_NNNNN.safetensors`: the prompts' embeddings stored once, cut to their true token length (`tokens`, one
  prompt's rows after another, and `lengths`); `text_padding.pad_text` gives back WanPipeline's zero-padded
  512-token tensors exactly. `negative_embeds.safetensors` holds the negative prompt's the same way.
- `shard_NNNNN.safetensors`: the targets of those prompts (latent-sized tensors in `spec.dtype`, the velocity
  `spec.velocity` keeps) and, for trajectories, their final latents.
- `cache_header.json` (written first) and `manifest.json` (written last, by rank 0: the cache is complete).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import json
import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import (
    LATENT_KEYS, TRAJECTORY_TABLE, TargetSet, TargetSpec, compute_targets, concat_records, trajectory_starts,
)
from .text_padding import pad_text, trim_text

# 3: compact: latent-sized tensors in spec.dtype, one stored velocity unless spec.velocity="both", prompt
#    embeddings cut to their true length and stored once per shard (text_NNNNN)
# 2: trajectory shards also hold each trajectory's final latents and each record's trajectory id (reflow's pairs)
CACHE_FORMAT = 3
# Prompts recorded together: A14B swaps its 14 B experts once per group (every trajectory's high-noise steps run
# before any low-noise step), and the group's targets are what recording holds in memory (float32 until written:
# at 512², 40 steps, ~4 GB; two expert loads per group cost a few % of its recording time).
RECORD_GROUP_PROMPTS = 128
NEGATIVE_FILE = "negative_embeds.safetensors"
# Shards whose records training mixes at a time (ShardedShuffleSampler): a batch draws from this many shards'
# prompts, and reading keeps to them.
SHUFFLE_WINDOW_SHARDS = 8


def save_atomically(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write tensors (and string `metadata`) to a safetensors file that appears complete or not at all (temp name,
    fsync, rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


CACHE_HEADER = "cache_header.json"  # written when a build starts, so a partial cache is checked too
_HEADER_WORDS = {"format": "cache format", "teacher_fingerprint": "teacher", "spec": "target settings",
                 "prompts_sha256": "prompts"}


def cache_header(teacher_fingerprint: str, spec: TargetSpec, prompts: list[str]) -> dict:
    """What a target cache must have been made with: the teacher (`Teacher.fingerprint`), spec and prompts."""
    return {"format": CACHE_FORMAT, "teacher_fingerprint": teacher_fingerprint, "spec": asdict(spec),
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}


def open_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec, prompts: list[str], *,
                      discard_mismatch: bool = False) -> str:
    """The state of the target cache in `cache_dir` for this teacher, spec and prompts: "complete", "partial"
    (a build was interrupted) or "empty". Every reader and writer of a cache goes through here.

    A cache made with another teacher, spec or prompts (or of unknown origin, or by an older kit in another cache
    format) raises a ValueError, or with `discard_mismatch=True` its target files are deleted and the state is
    "empty".
    """
    from .teacher import read_json

    cache_dir = Path(cache_dir)
    header = cache_header(teacher_fingerprint, spec, prompts)
    found, state = None, "empty"
    for name, name_state in (("manifest.json", "complete"), (CACHE_HEADER, "partial")):
        if (cache_dir / name).is_file():
            found, state = read_json(cache_dir / name), name_state
            break
    if found is None and not any(cache_dir.glob("shard_*.safetensors")):
        return "empty"
    differs = ["origin unknown"] if found is None else [
        _HEADER_WORDS[key] for key in header if not isinstance(found, dict) or found.get(key) != header[key]]
    if not differs:
        return state
    if not discard_mismatch:
        older = isinstance(found, dict) and found.get("format") != CACHE_FORMAT
        if older:
            raise ValueError(f"the target cache {cache_dir} is in cache format {found.get('format')}, from another "
                             f"version of wandistiller (this one reads format {CACHE_FORMAT}): pass overwrite=True to "
                             "record it again, or another cache_dir (the existing one is kept)")
        if "target settings" in differs and isinstance(found.get("spec"), dict):
            differs[differs.index("target settings")] = f"target settings ({_spec_differences(found['spec'], spec)})"
        raise ValueError(f"the target cache {cache_dir} was made with other {', '.join(differs)}: pass overwrite=True "
                         "to discard it, or another cache_dir (the existing one is kept)")
    for path in [cache_dir / "manifest.json", cache_dir / CACHE_HEADER, cache_dir / NEGATIVE_FILE,
                 cache_dir / "prompt_embeds.safetensors", *cache_dir.glob("shard_*.safetensors"),
                 *cache_dir.glob("text_*.safetensors")]:
        path.unlink(missing_ok=True)
    return "empty"


def _spec_differences(found: dict, spec: TargetSpec) -> str:
    """`name: cached value, not wanted value` for each TargetSpec field that differs."""
    return "; ".join(f"{f.name}: {found.get(f.name)!r} in the cache, {getattr(spec, f.name)!r} wanted"
                     for f in fields(spec) if found.get(f.name) != getattr(spec, f.name))


LOCK_FILE = "cache.lock"
LOCK_HEARTBEAT_SECONDS = 60  # how often the holder touches its lock
LOCK_STALE_SECONDS = 600  # a lock nobody touched for this long is left by a job that is gone (any host)


class CacheLock:
    """The one writer of a target cache: `cache.lock` names the host and process writing it (rank 0 of its job)
    and is touched every `LOCK_HEARTBEAT_SECONDS` while held. Another job is refused; a lock whose process is gone
    (on this host: no such process; on any host: untouched for `LOCK_STALE_SECONDS`) is stale and taken over.
    Held from the first prompt encoded to the manifest written; taking it again in the same process is a no-op."""

    _held: dict[Path, CacheLock] = {}

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / LOCK_FILE
        self._stop = None

    @classmethod
    def acquire(cls, cache_dir: Path) -> CacheLock:
        path = (Path(cache_dir) / LOCK_FILE).resolve()
        if path in cls._held:
            return cls._held[path]
        lock = cls(cache_dir)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):  # a stale lock is removed, then taken
            try:
                fd = os.open(lock.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                lock._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(dict(me, started=time.strftime("%Y-%m-%d %H:%M:%S")), f)
            lock._heartbeat()
            cls._held[path] = lock
            return lock
        raise RuntimeError(f"could not take the lock {lock.path}: another job is taking it at the same time")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):  # being written or removed by another job at this very moment
            time.sleep(0.5)
            return
        here = holder.get("host") == socket.gethostname()
        if (here and not _process_alive(holder.get("pid"))) or age > LOCK_STALE_SECONDS:
            warnings.warn(f"taking over the stale lock {self.path} of process {holder.get('pid')} on "
                          f"{holder.get('host')} (gone{'' if here else f', untouched for {age:.0f} s'})")
            self.path.unlink(missing_ok=True)
            return
        raise RuntimeError(f"another job (process {holder.get('pid')} on {holder.get('host')}, since "
                           f"{holder.get('started')}) is writing the target cache {self.path.parent}: wait for it, or "
                           f"choose another cache_dir; if that job is gone, delete {self.path}")

    def _heartbeat(self) -> None:
        self._stop = threading.Event()

        def touch():
            while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        threading.Thread(target=touch, daemon=True, name="cache-lock-heartbeat").start()

    def release(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)
        type(self)._held.pop(self.path.resolve(), None)


def _process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or a lock we cannot read: not ours to call gone
    return True


def wait_for_files(paths: list[Path], poll_seconds: float = 2.0) -> None:
    """Return once every path exists. Ranks that finish their share early wait here, by looking at the disk, rather
    than in a collective that would time out while the others record for hours (torchrun ends the job if a rank
    fails)."""
    while not all(path.is_file() for path in paths):
        time.sleep(poll_seconds)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may write the same file
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def shard_prompts(num_prompts: int, spec: TargetSpec) -> list[range]:
    """The prompts of each shard: consecutive runs of `spec.shard_prompts`."""
    return [range(i, min(i + spec.shard_prompts, num_prompts)) for i in range(0, num_prompts, spec.shard_prompts)]


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _text_name(k: int) -> str:
    return f"text_{k:05d}.safetensors"


def _start(teacher, prompts: list[str], cache_dir: Path, spec: TargetSpec, rank: int, barrier) -> bool:
    """Check the cache against this teacher, spec and prompts and mark it as being built, rank 0 taking its lock
    (`CacheLock`) before any rank writes; True if it is complete."""
    if open_target_cache(cache_dir, teacher.fingerprint, spec, prompts) == "complete":
        return True
    cache_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        CacheLock.acquire(cache_dir)
    _write_json(cache_header(teacher.fingerprint, spec, prompts), cache_dir / CACHE_HEADER)
    if barrier is not None:
        barrier()
    return False


def write_prompt_embeddings(teacher, prompts: list[str], cache_dir: str | Path, spec: TargetSpec, *, rank: int = 0,
                            world_size: int = 1, barrier=None, progress=True) -> None:
    """The text files of a target cache: each shard's prompt embeddings, cut to their true length, and the negative
    prompt's. The text side of recording, done before any expert is loaded (the text encoder can then be freed);
    resumable and split across ranks as `build_target_cache`, which calls it (a no-op once done). Every rank
    keeps the negative prompt's embedding in the teacher, since recording needs it."""
    cache_dir = Path(cache_dir)
    if _start(teacher, prompts, cache_dir, spec, rank, barrier):
        return
    negative = teacher.encode_prompts("")  # Wan's default negative prompt, kept in the teacher
    if rank == 0 and not (cache_dir / NEGATIVE_FILE).is_file():
        save_atomically(dict(zip(("tokens", "lengths"), trim_text(negative))), cache_dir / NEGATIVE_FILE)
    shards = shard_prompts(len(prompts), spec)
    pending = [k for k in range(rank, len(shards), world_size) if not (cache_dir / _text_name(k)).is_file()]
    for group in tqdm(_groups(pending, shards), desc="encoding prompts", disable=not progress or not pending,
                      leave=False):  # a group at a time: the text encoder takes its batches whole
        embeds = teacher.encode_prompts([prompts[i] for k in group for i in shards[k]], keep=False)
        for k, part in zip(group, embeds.split([len(shards[k]) for k in group])):
            save_atomically(dict(zip(("tokens", "lengths"), trim_text(part))), cache_dir / _text_name(k))


def read_embeddings(path: Path) -> torch.Tensor:
    """The zero-padded prompt embeddings (B, 512, D) kept in a text file of the cache."""
    from safetensors.torch import load_file

    text = load_file(path)
    return pad_text(text["tokens"], text["lengths"])


def build_target_cache(teacher, prompts: list[str], cache_dir: str | Path, spec: TargetSpec, *,
                       rank: int = 0, world_size: int = 1, barrier=None, progress=True) -> Path:
    """Write the teacher targets for `prompts` to `cache_dir` (resumable; shards split across ranks).

    The prompts are encoded first (`write_prompt_embeddings`, skipped when done), then recorded
    `RECORD_GROUP_PROMPTS` at a time, each shard written as soon as its group is done; finished shards are
    skipped, so an interrupted build continues where it stopped, with a progress bar (and its ETA) over this
    rank's prompts. With `barrier` (every rank of a job calls this), a rank that is done waits for the others'
    shards on disk, and rank 0 writes `manifest.json` last. A cache made with another teacher, spec or prompts
    is refused (see `open_target_cache`), as is a second job writing the same cache (see `CacheLock`).
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if _start(teacher, prompts, cache_dir, spec, rank, barrier):
        return manifest_path
    write_prompt_embeddings(teacher, prompts, cache_dir, spec, rank=rank, world_size=world_size, barrier=barrier,
                            progress=progress)
    negative = teacher.encode_prompts("")
    shards = shard_prompts(len(prompts), spec)
    pending = [k for k in range(rank, len(shards), world_size) if not (cache_dir / _shard_name(k)).is_file()]
    bar = tqdm(total=sum(len(shards[k]) for k in pending), desc="recording teacher targets", unit="prompt",
               disable=not progress or not pending)
    for group in _groups(pending, shards):
        indices = [i for k in group for i in shards[k]]
        embeds = torch.cat([read_embeddings(cache_dir / _text_name(k)) for k in group])
        targets = compute_targets(teacher, spec, indices, embeds, negative, progress=progress)
        for k in group:
            save_atomically(_shard_part(targets, torch.tensor(shards[k]), spec), cache_dir / _shard_name(k))
        bar.update(len(indices))
    bar.close()
    if barrier is not None:
        wait_for_files([cache_dir / _shard_name(k) for k in range(len(shards))])
        barrier()
    if rank == 0:
        counts = [_shard_length(cache_dir / _shard_name(k)) for k in range(len(shards))]
        manifest = dict(cache_header(teacher.fingerprint, spec, prompts), teacher=teacher.source, prompts=prompts,
                        negative=NEGATIVE_FILE,
                        shards=[{"file": _shard_name(k), "text": _text_name(k), "count": c,
                                 "prompts": [shards[k].start, shards[k].stop]} for k, c in enumerate(counts)])
        _write_json(manifest, manifest_path)
        CacheLock.acquire(cache_dir).release()
    if barrier is not None:
        barrier()
    return manifest_path


def _groups(pending: list[int], shards: list[range]) -> list[list[int]]:
    """`pending` shards in groups of about `RECORD_GROUP_PROMPTS` prompts (at least one shard each)."""
    groups, size = [], RECORD_GROUP_PROMPTS
    for k in pending:
        if size + len(shards[k]) > RECORD_GROUP_PROMPTS:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += len(shards[k])
    return groups


def _shard_part(targets: dict, prompts: torch.Tensor, spec: TargetSpec) -> dict:
    """The targets of `prompts` as a shard stores them: their records, and the rows of the trajectory table (if
    any) of their trajectories; latent-sized tensors in `spec.dtype`."""
    keep = torch.isin(targets["prompt_index"], prompts)
    part = {key: value[keep] for key, value in targets.items() if key not in TRAJECTORY_TABLE}
    if "final_prompt_index" in targets:
        keep = torch.isin(targets["final_prompt_index"], prompts)
        part.update({key: targets[key][keep] for key in TRAJECTORY_TABLE})
    dtype = getattr(torch, spec.dtype)
    return {key: value.to(dtype) if key in LATENT_KEYS else value for key, value in part.items()}


def _shard_length(path: Path) -> int:
    """Number of targets in a shard, read from its safetensors header (the tensors stay on disk)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_slice("timesteps").get_shape()[0]


def load_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec,
                      prompts: list[str]) -> tuple[TargetSet, dict]:
    """Read a complete target cache made with this teacher (`Teacher.fingerprint` or
    `TeacherInfo.fingerprint(dtype)`: no teacher weights needed), spec and prompts, all of it into memory: the
    TargetSet (latent-sized tensors in float32, embeddings zero-padded as WanPipeline's) and the manifest."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    if open_target_cache(cache_dir, teacher_fingerprint, spec, prompts) != "complete":
        raise FileNotFoundError(f"{cache_dir} holds no complete target cache (no manifest.json): build it first")
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    records = concat_records([load_file(cache_dir / s["file"]) for s in manifest["shards"]])
    records = {key: value.float() if key in LATENT_KEYS else value for key, value in records.items()}
    embeds = torch.cat([read_embeddings(cache_dir / s["text"]) for s in manifest["shards"]])
    return TargetSet(records, embeds, read_embeddings(cache_dir / manifest["negative"]),
                     [s["count"] for s in manifest["shards"]]), manifest


def stream_target_cache(cache_dir: str | Path, teacher_fingerprint: str, spec: TargetSpec,
                        prompts: list[str]) -> TargetShards:
    """A complete target cache made with this teacher, spec and prompts, read from disk as it is used
    (`TargetShards`): what training holds in memory does not grow with the cache."""
    cache_dir = Path(cache_dir)
    if open_target_cache(cache_dir, teacher_fingerprint, spec, prompts) != "complete":
        raise FileNotFoundError(f"{cache_dir} holds no complete target cache (no manifest.json): build it first")
    return TargetShards(cache_dir, json.loads((cache_dir / "manifest.json").read_text()))


class TargetShards(torch.utils.data.Dataset):
    """A complete target cache read from its shards on disk, record by record, memory-mapped (safetensors'
    `safe_open`): an item is what `TargetSet` gives for the same index (latent-sized tensors in float32, the
    prompt's embeddings re-padded). At most a window's worth of shards (`SHUFFLE_WINDOW_SHARDS` + 1) is open,
    and only the pages read are resident; `ShardedShuffleSampler` order keeps to a window at a time."""

    def __init__(self, cache_dir: Path, manifest: dict):
        self.cache_dir, self.shards = Path(cache_dir), manifest["shards"]
        self.shard_sizes = [s["count"] for s in self.shards]
        self.starts = [0, *itertools.accumulate(self.shard_sizes)]
        self.prompt_starts = [s["prompts"][0] for s in self.shards]
        self.trajectories_per_prompt = manifest["spec"]["trajectories_per_prompt"]
        self.negative_embeds = read_embeddings(self.cache_dir / manifest["negative"])
        self._open = collections.OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict:  # DataLoader workers open their own files
        return dict(self.__dict__, _open=collections.OrderedDict())

    def _shard(self, k: int) -> _OpenShard:
        """Shard k, opened on first use; the least recently used is closed beyond a window's worth."""
        if k not in self._open:
            if len(self._open) > SHUFFLE_WINDOW_SHARDS:
                self._open.popitem(last=False)
            shard = self.shards[k]
            self._open[k] = _OpenShard(self.cache_dir / shard["file"], self.cache_dir / shard["text"],
                                       shard["prompts"][0], self.trajectories_per_prompt)
        self._open.move_to_end(k)
        return self._open[k]

    def __getitem__(self, index: int) -> dict:
        k = bisect.bisect_right(self.starts, index) - 1
        return self._shard(k).record(index - self.starts[k])

    def _prompt_shard(self, prompt: int) -> int:
        return bisect.bisect_right(self.prompt_starts, prompt) - 1

    def embeddings(self, prompt_indices) -> torch.Tensor:
        """The zero-padded embeddings (B, 512, D) of the prompts `prompt_indices`."""
        prompts = torch.as_tensor(prompt_indices).tolist()
        return torch.stack([self._shard(self._prompt_shard(p)).embedding(p) for p in prompts])

    def reflow_pairs(self, trajectories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, final) of the trajectories `trajectories`, as `TargetSet.reflow_pairs` gives them."""
        pairs = [self._shard(self._prompt_shard(t // self.trajectories_per_prompt)).reflow_pair(t)
                 for t in torch.as_tensor(trajectories).tolist()]
        return tuple(torch.stack(column) for column in zip(*pairs))


class _OpenShard:
    """One shard and its text file, open: every tensor a view of the file mapped into memory (safetensors'
    `safe_open`), so a record reads only its own pages and closing the shard gives them back."""

    def __init__(self, path: Path, text_path: Path, first_prompt: int, trajectories_per_prompt: int):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as targets, safe_open(text_path, framework="pt") as text:
            self.tensors = {key: targets.get_tensor(key) for key in targets.keys()}
            self.tokens, lengths = text.get_tensor("tokens"), text.get_tensor("lengths")
        self.first_prompt, self.k = first_prompt, trajectories_per_prompt
        self.lengths, self.offsets = lengths, [0, *itertools.accumulate(lengths.tolist())]
        self.records = {key: value for key, value in self.tensors.items() if key not in TRAJECTORY_TABLE}
        self._starts = None

    def embedding(self, prompt: int) -> torch.Tensor:
        p = prompt - self.first_prompt
        return pad_text(self.tokens[self.offsets[p]:self.offsets[p + 1]], self.lengths[p:p + 1])[0]

    def record(self, row: int) -> dict:
        item = {key: value[row].float() if key in LATENT_KEYS else value[row] for key, value in self.records.items()}
        return dict(item, prompt_embeds=self.embedding(int(item["prompt_index"])))

    def reflow_pair(self, trajectory: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tensors
        if "trajectory" not in t or "final_latents" not in t:
            raise ValueError("these targets hold no teacher trajectories (noise, final latents): reflow needs "
                             "latent_source='trajectory'")
        first = self.first_prompt * self.k  # this shard's first trajectory: its table starts there
        if self._starts is None:
            self._starts = trajectory_starts(t["trajectory"], t["timesteps"], t["prompt_index"],
                                             t["final_prompt_index"], first)
        return t["latents"][self._starts[trajectory - first]].float(), t["final_latents"][trajectory - first].float()


class ShardedShuffleSampler(torch.utils.data.Sampler):
    """This rank's share of each epoch's order over records stored in shards of `shard_sizes` records, reading a
    few shards at a time, exact under DDP and resume.

    Epoch e takes the shards in an order drawn from (seed, e), `window` (default `SHUFFLE_WINDOW_SHARDS`) at a
    time; each window's records (its shards in index order) are shuffled together by a generator seeded with
    seed + e and drawn from window after window. A cache of one window gives `DistributedSampler`'s order
    exactly. Ranks deal the order as `DistributedSampler(drop_last=True)` does, position p to rank p mod
    world_size: a global batch holds the records one process would. `set_epoch(epoch, start)` begins at this
    rank's `start`-th record, so a resumed run reads nothing it skips and then what the uninterrupted run read.
    """

    def __init__(self, shard_sizes: list[int], *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 window: int | None = None):
        self.shard_sizes, self.num_replicas, self.rank, self.seed = list(shard_sizes), num_replicas, rank, seed
        self.window = window or SHUFFLE_WINDOW_SHARDS
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """Every record index once, in epoch `epoch`'s order (the same on every rank)."""
        starts = [0, *itertools.accumulate(self.shard_sizes)]
        shards = torch.arange(len(self.shard_sizes))
        if len(shards) > self.window:
            key = hashlib.sha256(f"shards:{self.seed}:{epoch}".encode()).digest()
            shards = shards[torch.randperm(len(shards), generator=torch.Generator().manual_seed(
                int.from_bytes(key[:8], "little")))]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        parts = []
        for window in shards.split(self.window):
            records = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in window.sort().values.tolist()])
            parts.append(records[torch.randperm(len(records), generator=generator)])
        return torch.cat(parts)

    def __len__(self) -> int:
        return sum(self.shard_sizes) // self.num_replicas

    def __iter__(self):
        mine = self.order(self.epoch)[self.rank:len(self) * self.num_replicas:self.num_replicas]
        return iter(mine[self.start:].tolist())


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_bytes_per_prompt(spec: TargetSpec, *, latent_channels: int, latent_hw: tuple[int, int], text_dim: int,
                           text_tokens: float, text_dtype: str = "float32") -> float:
    """Bytes a prompt takes in a target cache written with `spec` (safetensors headers aside).

    Per record: the input latents and the kept velocity (one tensor, or v_cond and v_uncond with
    velocity="both"), C x h x w each in `spec.dtype`; the timestep and guidance (float32), the prompt index
    (int64) and, for trajectories, the trajectory id (int64). Per trajectory: its final latents and prompt index.
    Per prompt: its embeddings, `text_tokens` rows of `text_dim` in the teacher's `text_dtype`, and their length.
    """
    latent = latent_channels * latent_hw[0] * latent_hw[1] * _DTYPE_BYTES[spec.dtype]
    per_record = (2 + (spec.velocity == "both")) * latent + 4 + 4 + 8
    if spec.latent_source == "trajectory":
        steps = len(spec.kept_steps())
        targets = spec.trajectories_per_prompt * (steps * (per_record + 8) + latent + 8)
    else:
        targets = spec.samples_per_prompt * per_record
    return targets + text_tokens * text_dim * _DTYPE_BYTES[text_dtype] + 8
