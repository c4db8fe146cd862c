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
from sfd_train.data_pipeline.format import SEMANTIC, TEXTURE, SampleLayout, from_storage
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
    shapes: dict[str, tuple[int, ...]]
    """``{field: shape}`` of the array fields the source provides."""

    def read(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Returns ``({field: array (B, ...) in the storage dtype}, labels (B,))`` for source ``indices``."""
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


def _write_shard(source: SampleSource, task: _ShardTask) -> dict[str, Any]:
    """Writes one shard (temp name, then rename) and returns its record."""
    with one_torch_thread():
        return _write_shard_body(source, task)


def _write_shard_body(source: SampleSource, task: _ShardTask) -> dict[str, Any]:
    layout = SampleLayout(source.shapes, source.storage_dtype)
    final = os.path.join(task.folder, task.name)
    tmp = f"{final}.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    stats = {"texture": ChannelStats(source.shapes[TEXTURE][0]), "semantic": ChannelStats(source.shapes[SEMANTIC][0])}
    count = len(task.source_indices)
    with open(tmp, "wb") as f:
        for lo in range(0, count, _READ_BLOCK):
            indices = task.source_indices[lo : lo + _READ_BLOCK]
            arrays, labels = source.read(indices)
            for j in range(len(indices)):
                sample = layout.encode(task.first_index + lo + j, {k: arrays[k][j] for k in layout.shapes}, int(labels[j]))
                digest.update(sample)
                f.write(sample)
            if task.compute_stats:
                stats["texture"].update(from_storage(arrays[TEXTURE], source.storage_dtype))
                stats["semantic"].update(from_storage(arrays[SEMANTIC], source.storage_dtype))
        trailer = bytes(layout.shard_bytes(0))
        digest.update(trailer)
        f.write(trailer)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    record = {
        "name": task.name,
        "count": count,
        "first_index": task.first_index,
        "bytes": layout.shard_bytes(count),
        "sha256": digest.hexdigest(),
        "stats": {part: s.state() for part, s in stats.items()} if task.compute_stats else None,
    }
    _write_json(os.path.join(task.folder, STATE_DIR, task.name + ".json"), record)
    return record


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


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
        WriterError: ``out_dir`` holds a different job's output.
    """
    out_dir = os.fspath(out_dir)
    n = int(source.num_samples)
    if n <= 0:
        raise WriterError("the source has no samples")
    if shard_size <= 0:
        raise WriterError(f"shard_size must be positive, got {shard_size}")
    num_shards = -(-n // shard_size)
    names = [f"{SHARD_PREFIX}{i:06d}.tar" for i in range(num_shards)]
    plan = {
        "source": source.describe(),
        "num_samples": n,
        "shard_size": shard_size,
        "seed": seed,
        "shuffle": shuffle,
        "storage_dtype": source.storage_dtype,
        "shapes": {k: list(v) for k, v in source.shapes.items()},
    }
    plan_path = os.path.join(out_dir, STATE_DIR, "plan.json")
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        existing = read_manifest(out_dir)
        if existing.provenance.get("parameters") == plan:
            logger.info("%s already holds this dataset; nothing to do", out_dir)
            return existing
        raise WriterError(f"{out_dir} already holds a different dataset; use another folder or delete it")
    os.makedirs(os.path.join(out_dir, STATE_DIR), exist_ok=True)
    if os.path.exists(plan_path):
        with open(plan_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != plan:
            raise WriterError(f"{out_dir} holds an unfinished job with other parameters ({previous}); use another folder or delete it")
    elif any(os.path.exists(os.path.join(out_dir, nm)) for nm in names):
        raise WriterError(f"{out_dir} already holds a dataset; use another folder or delete it")
    _write_json(plan_path, plan)

    layout = SampleLayout(source.shapes, source.storage_dtype)
    perm = writer_permutation(n, seed) if shuffle else np.arange(n, dtype=np.int64)
    tasks, records = [], {}
    for i, name in enumerate(names):
        lo, hi = i * shard_size, min((i + 1) * shard_size, n)
        done = _finished(out_dir, name, layout.shard_bytes(hi - lo))
        if done is not None:
            records[name] = done
        else:
            tasks.append(_ShardTask(out_dir, name, lo, perm[lo:hi], stats is None))
    if records:
        logger.info("resuming: %d of %d shards already written", len(records), num_shards)

    bar = tqdm(total=n, initial=sum(r["count"] for r in records.values()), unit="sample", desc="writing shards",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                records[task.name] = _write_shard(source, task)
                bar.update(len(task.source_indices))
        else:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                futures = {pool.submit(_write_shard, source, task): task for task in tasks}
                for fut in cf.as_completed(futures):
                    rec = fut.result()
                    records[rec["name"]] = rec
                    bar.update(rec["count"])

    if stats is None:
        merged = {"texture": ChannelStats(source.shapes[TEXTURE][0]), "semantic": ChannelStats(source.shapes[SEMANTIC][0])}
        for name in names:
            for part, state in records[name]["stats"].items():
                merged[part].merge(ChannelStats.from_state(state))
        stats = {part: s.to_record() for part, s in merged.items()}
        stats_source = f"computed while writing, over the {n} non-flipped samples (per channel over samples, H, W; unbiased std)"

    manifest = Manifest(
        num_samples=n,
        num_classes=int(source.num_classes),
        storage_dtype=source.storage_dtype,
        shapes=dict(source.shapes),
        shards=tuple(ShardInfo(**{k: records[nm][k] for k in ("name", "count", "first_index", "bytes", "sha256")}) for nm in names),
        stats={part: {"mean": list(v["mean"]), "std": list(v["std"])} for part, v in stats.items() if part in ("texture", "semantic")},
        stats_source=stats_source,
        order={"shuffled": bool(shuffle), "seed": int(seed), "permutation": "sfd_train.data_pipeline.order.writer_permutation"},
        provenance={"command": command, "source": source.describe(), "tool": f"sfd-train {_tool_version()}", "parameters": plan},
        shard_pattern=brace_pattern(SHARD_PREFIX, num_shards),
    )
    write_manifest(manifest, out_dir)
    shutil.rmtree(os.path.join(out_dir, STATE_DIR), ignore_errors=True)
    return manifest


def _tool_version() -> str:
    try:
        return importlib.metadata.version("sfd-train")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def is_complete(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a finished dataset (a manifest is written last)."""
    return os.path.exists(os.path.join(out_dir, MANIFEST_NAME))

