"""Writing a dataset: shards in parallel processes, resumable, manifest last.

A *source* hands out samples by source index (the synthetic generator, the
published-layout converter). The writer fixes the storage order (a seeded
permutation of the source), splits it into shards and writes each shard to a
temporary name, renaming it into place only when complete; a small record of
each finished shard (its checksum and partial statistics) goes into
``.sfd-write/``. A re-run of the same job skips finished shards; a run with
different parameters into the same folder is refused. The manifest is written
last and the records are then removed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from tqdm import tqdm

from sfd_train.data_pipeline.errors import WriterError
from sfd_train.data_pipeline.format import BLOCK, LABEL, SEMANTIC, TEXTURE, SampleLayout, from_storage
from sfd_train.data_pipeline.manifest import MANIFEST_NAME, Manifest, ShardInfo, brace_pattern, read_manifest, write_manifest
from sfd_train.data_pipeline.order import writer_permutation
from sfd_train.data_pipeline.stats import ChannelStats

logger = logging.getLogger(__name__)

STATE_DIR = ".sfd-write"
SHARD_PREFIX = "train-"
# Samples fetched from a source at once; bounds the writer's memory.
_READ_BLOCK = 64


class SampleSource(Protocol):
    """Where samples come from. Must be picklable (it is sent to worker processes)."""

    num_samples: int
    num_classes: int
    storage_dtype: str
    dino_storage: str | None
    """How the features are stored: None (like the latents) or ``"int8"`` (see :mod:`.compact`)."""
    shapes: dict[str, tuple[int, ...]]
    """``{field: shape}`` of the array fields the source provides."""

    def read(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Returns ``({member: array (B, ...) as stored}, labels (B,))`` for source ``indices``
        (see :func:`~.format.to_stored_arrays`)."""
        ...

    def describe(self) -> str:
        """One line saying where the samples come from (for the manifest's provenance)."""
        ...


@dataclass(frozen=True)
class _ShardTask:
    folder: str
    name: str
    first_index: int
    source_indices: np.ndarray
    compute_stats: bool


@contextlib.contextmanager
def one_torch_thread():
    # The writer's tensors are small; torch's thread pool only adds overhead, and
    # its spinning threads slow everything down badly on a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ShardWriter:
    """One shard being written: samples appended in storage order to a temporary file;
    :meth:`finish` renames it into place and records it in ``.sfd-write/``.

    Use it as a context manager: leaving the block without :meth:`finish` (an error)
    removes the temporary file, so no half-written shard is ever left under its name.

    Args:
        folder: the dataset folder.
        name: the shard's file name.
        first_index: global index of the shard's first sample.
        layout: the dataset's sample layout.
        compute_stats: accumulate the per-channel statistics of the non-flipped latents.
    """

    def __init__(self, folder: str, name: str, first_index: int, layout: SampleLayout, compute_stats: bool = True):
        self.folder, self.name, self.first_index, self.layout = folder, name, first_index, layout
        self.final = os.path.join(folder, name)
        self.tmp = f"{self.final}.tmp-{os.getpid()}"
        self.digest = hashlib.sha256()
        self.count = 0
        self.stats = ({part: ChannelStats(layout.shapes[field][0]) for part, field in (("texture", TEXTURE),
                                                                                     ("semantic", SEMANTIC))}
                      if compute_stats else None)
        self._file = None

    def __enter__(self) -> "ShardWriter":
        self._file = open(self.tmp, "wb")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:  # finish() was not reached
            self._file.close()
            self._file = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp)

    def add(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
        """Appends samples: ``{member: (B, ...)}`` as stored and their labels (B,)."""
        for j in range(len(labels)):
            sample = self.layout.encode(self.first_index + self.count + j,
                                        {k: arrays[k][j] for k in self.layout.array_fields}, int(labels[j]))
            self.digest.update(sample)
            self._file.write(sample)
        self.count += len(labels)
        if self.stats is not None:
            for part, field in (("texture", TEXTURE), ("semantic", SEMANTIC)):
                self.stats[part].update(from_storage(arrays[field], self.layout.storage_dtype))

    def finish(self) -> dict[str, Any]:
        """Ends the archive, renames it into place and returns (and stores) its record."""
        trailer = bytes(self.layout.shard_bytes(0))
        self.digest.update(trailer)
        self._file.write(trailer)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.final)
        record = {
            "name": self.name,
            "count": self.count,
            "first_index": self.first_index,
            "bytes": self.layout.shard_bytes(self.count),
            "sha256": self.digest.hexdigest(),
            "stats": {part: s.state() for part, s in self.stats.items()} if self.stats is not None else None,
        }
        write_json(os.path.join(self.folder, STATE_DIR, self.name + ".json"), record)
        return record


def _write_shard(source: SampleSource, task: _ShardTask) -> dict[str, Any]:
    """Writes one shard of ``source`` (temp name, then rename) and returns its record."""
    layout = SampleLayout(source.shapes, source.storage_dtype, source.dino_storage)
    with one_torch_thread(), ShardWriter(task.folder, task.name, task.first_index, layout, task.compute_stats) as shard:
        for lo in range(0, len(task.source_indices), _READ_BLOCK):
            shard.add(*source.read(task.source_indices[lo : lo + _READ_BLOCK]))
        return shard.finish()


def write_json(path: str, data: Any) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def claim_plan(path: str, plan: Mapping[str, Any]) -> list[str]:
    """Compares ``plan`` with the job plan saved at ``path``, or saves it there if there is none.

    A resumable job (shards, sample chunks) may only continue work that was started with the same
    parameters; each caller turns a mismatch into its own error.

    Returns:
        The keys whose values differ from the saved plan, sorted; empty when they agree (or ``path``
        held no plan, which is then written atomically).
    """
    plan = dict(plan)
    if not os.path.exists(path):
        write_json(path, plan)
        return []
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    return sorted(k for k in set(plan) | set(previous) if plan.get(k) != previous.get(k))


def read_shard_arrays(path: str, layout: SampleLayout, count: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every sample of a local shard: ``({member: (count, ...) as stored}, labels (count,))``."""
    data = np.fromfile(path, dtype=np.uint8, count=count * layout.stride).reshape(count, layout.stride)
    arrays = {}
    for name, member in layout.members.items():
        if name == LABEL:
            continue
        raw = data[:, member.payload_offset : member.payload_offset + member.payload_bytes]
        arrays[name] = np.ascontiguousarray(raw).view(member.dtype).reshape(count, *member.shape)
    label = layout.members[LABEL]
    labels = np.array([int(bytes(row[label.payload_offset : label.payload_offset + BLOCK]).split(b"\0", 1)[0])
                       for row in data], dtype=np.int64)
    return arrays, labels


def _finished(folder: str, name: str, expected_bytes: int) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier run, or None."""
    path = os.path.join(folder, STATE_DIR, name + ".json")
    shard = os.path.join(folder, name)
    if not (os.path.exists(path) and os.path.exists(shard)):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("bytes") != expected_bytes or os.path.getsize(shard) != expected_bytes:
        return None
    return record


def _pool_context():
    # fork is how torch's own DataLoader starts workers on Linux, and it avoids
    # re-importing torch in every worker; elsewhere fall back to spawn.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def shard_names(num_samples: int, shard_size: int) -> list[str]:
    """File names of the shards of a dataset of ``num_samples`` cut into ``shard_size``."""
    if num_samples <= 0:
        raise WriterError("the source has no samples")
    if shard_size <= 0:
        raise WriterError(f"shard_size must be positive, got {shard_size}")
    return [f"{SHARD_PREFIX}{i:06d}.tar" for i in range(-(-num_samples // shard_size))]


def prepare_job(out_dir: str, plan: Mapping[str, Any], names: list[str], layout: SampleLayout, shard_size: int,
                num_samples: int) -> dict[str, dict[str, Any]]:
    """Claims ``out_dir`` for the job ``plan``; returns the records of shards an earlier run finished.

    Raises:
        WriterError: ``out_dir`` holds a finished dataset or an unfinished job with other parameters.
    """
    plan_path = os.path.join(out_dir, STATE_DIR, "plan.json")
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        raise WriterError(f"{out_dir} already holds a different dataset; use another folder or delete it")
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    if not os.path.exists(plan_path) and any(os.path.exists(os.path.join(out_dir, nm)) for nm in names):
        raise WriterError(f"{out_dir} already holds shards of another job; use another folder or delete it")
    differing = claim_plan(plan_path, plan)
    if differing:
        raise WriterError(f"{out_dir} holds an unfinished job with other parameters ({', '.join(differing)} "
                          "differ); run it with its own parameters, or use another folder")
    remove_leftovers(out_dir)
    records = {}
    for i, name in enumerate(names):
        count = min((i + 1) * shard_size, num_samples) - i * shard_size
        done = _finished(out_dir, name, layout.shard_bytes(count))
        if done is not None:
            records[name] = done
    return records


def remove_leftovers(out_dir: str) -> None:
    """Deletes the temporary shards of killed runs (``*.tmp-<pid>``): they are never resumed from."""
    for entry in os.scandir(out_dir):
        if ".tmp-" in entry.name and entry.is_file():
            logger.info("removing %s, left by an interrupted run", entry.path)
            os.remove(entry.path)


def finish_dataset(out_dir: str, names: list[str], layout: SampleLayout, *, num_classes: int, plan: Mapping[str, Any],
                   command: str, source: str, shuffle: bool, seed: int,
                   stats: Mapping[str, Mapping[str, Any]] | None = None, stats_source: str = "",
                   extra_provenance: Mapping[str, Any] | None = None,
                   keep_stats: Mapping[str, Mapping[str, Any]] | None = None) -> Manifest:
    """Writes ``manifest.json`` from the records of all ``names`` (every shard must be finished), then
    removes the job's records.

    Args:
        stats: per-part ``{"mean", "std"}`` to record instead of the ones computed while writing.
        keep_stats: parts whose recorded statistics stay as given (the rest are computed).
    """
    records = {}
    for name in names:
        with open(os.path.join(out_dir, STATE_DIR, name + ".json"), encoding="utf-8") as f:
            records[name] = json.load(f)
    n = sum(records[name]["count"] for name in names)
    if stats is None:
        merged = {part: ChannelStats(layout.shapes[field][0]) for part, field in (("texture", TEXTURE), ("semantic", SEMANTIC))}
        for name in names:
            for part, state in (records[name]["stats"] or {}).items():
                merged[part].merge(ChannelStats.from_state(state))
        stats = {part: s.to_record() for part, s in merged.items()}
        stats.update(keep_stats or {})
        stats_source = f"computed while writing, over the {n} non-flipped samples (per channel over samples, H, W; unbiased std)"
    provenance = {"command": command, "source": source, "tool": f"sfd-train {_tool_version()}", "parameters": dict(plan)}
    provenance.update(extra_provenance or {})
    manifest = Manifest(
        num_samples=n,
        num_classes=int(num_classes),
        storage_dtype=layout.storage_dtype,
        dino_storage=layout.dino_storage,
        shapes=dict(layout.shapes),
        shards=tuple(ShardInfo(**{k: records[nm][k] for k in ("name", "count", "first_index", "bytes", "sha256")}) for nm in names),
        stats={part: {"mean": list(v["mean"]), "std": list(v["std"])} for part, v in stats.items() if part in ("texture", "semantic")},
        stats_source=stats_source,
        order={"shuffled": bool(shuffle), "seed": int(seed), "permutation": "sfd_train.data_pipeline.order.writer_permutation"},
        provenance=provenance,
        shard_pattern=brace_pattern(SHARD_PREFIX, len(names)),
    )
    write_manifest(manifest, out_dir)
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    return manifest


def write_dataset(
    out_dir: str | os.PathLike,
    source: SampleSource,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 1,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    stats_source: str = "",
    command: str = "",
    progress: bool = True,
) -> Manifest:
    """Writes ``source`` as shards plus ``manifest.json`` into ``out_dir`` (local folder).

    Args:
        out_dir: output folder (created).
        source: the samples.
        shard_size: samples per shard (the last shard may hold fewer).
        seed: seed of the storage permutation.
        shuffle: store samples in a seeded random permutation of the source order
            (recommended: the reader's chunked epoch order relies on it).
        workers: processes writing shards in parallel.
        stats: per-part ``{"mean", "std"}`` to record instead of computing them.
        stats_source: what ``stats`` are (recorded in the manifest).
        command: the command line that produced the dataset (provenance).
        progress: show a progress bar on stderr.

    Returns:
        The written manifest.

    Raises:
        WriterError: ``out_dir`` holds a different job's output, or the source's fields cannot be
            stored as it asks (e.g. ``dino_storage="int8"`` without features).
    """
    out_dir = os.fspath(out_dir)
    n = int(source.num_samples)
    names = shard_names(n, shard_size)
    try:
        layout = SampleLayout(source.shapes, source.storage_dtype, source.dino_storage)
    except ValueError as err:
        raise WriterError(f"{source.describe()}: {err}") from None
    plan = {
        "source": source.describe(),
        "num_samples": n,
        "shard_size": shard_size,
        "seed": seed,
        "shuffle": shuffle,
        "storage_dtype": source.storage_dtype,
        "shapes": {k: list(v) for k, v in source.shapes.items()},
    }
    if source.dino_storage not in (None, source.storage_dtype):
        # Only then: the plans of jobs started before dino_storage existed stay valid.
        plan["dino_storage"] = source.dino_storage
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        existing = read_manifest(out_dir)
        if existing.provenance.get("parameters") == plan:
            logger.info("%s already holds this dataset; nothing to do", out_dir)
            return existing
    records = prepare_job(out_dir, plan, names, layout, shard_size, n)
    perm = writer_permutation(n, seed) if shuffle else np.arange(n, dtype=np.int64)
    tasks = []
    for i, name in enumerate(names):
        lo, hi = i * shard_size, min((i + 1) * shard_size, n)
        if name not in records:
            tasks.append(_ShardTask(out_dir, name, lo, perm[lo:hi], stats is None))
    if records:
        logger.info("resuming: %d of %d shards already written", len(records), len(names))

    bar = tqdm(total=n, initial=sum(r["count"] for r in records.values()), unit="sample", desc="writing shards",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _write_shard(source, task)
                bar.update(len(task.source_indices))
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                futures = {pool.submit(_write_shard, source, task): task for task in tasks}
                for fut in cf.as_completed(futures):
                    bar.update(fut.result()["count"])
    return finish_dataset(out_dir, names, layout, num_classes=source.num_classes, plan=plan, command=command,
                          source=source.describe(), shuffle=shuffle, seed=seed, stats=stats, stats_source=stats_source)


def _tool_version() -> str:
    try:
        return importlib.metadata.version("sfd-train")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished dataset (a manifest is written last)."""
    return os.path.exists(os.path.join(out_dir, MANIFEST_NAME))

