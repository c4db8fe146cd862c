"""Full checks of a dataset (``sfd-data inspect``) and statistics from its shards (``sfd-data stats``).

Unlike the reader, which trusts the layout and checks only what it reads, this
reads every shard from start to end through Python's ``tarfile`` (so it also
validates the tar structure as any tar reader sees it) and checks each member's
name, position, .npy header, shape, dtype and values, the labels, the sample
count, the file size and the SHA-256 recorded in the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from sfd_train.data_pipeline.format import LABEL, SEMANTIC, TEXTURE, from_storage, sample_key
from sfd_train.data_pipeline.manifest import Manifest, ShardInfo, read_manifest
from sfd_train.data_pipeline.stats import ChannelStats
from sfd_train.data_pipeline.storage import Storage
from sfd_train.data_pipeline.writer import one_torch_thread

MAX_ERRORS_PER_SHARD = 20
_STATS_BATCH = 256


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardReport:
    name: str
    count: int = 0
    """Samples found."""
    bad_samples: int = 0
    errors: list[str] = field(default_factory=list)
    """Messages, each naming the shard and, where it applies, the sample key."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_PER_SHARD:
            self.errors.append(message)
        elif len(self.errors) == MAX_ERRORS_PER_SHARD:
            self.errors.append("... further errors not listed")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "count": self.count, "bad_samples": self.bad_samples, "errors": list(self.errors)}


def _decode_array(data: bytes, manifest: Manifest, name: str) -> np.ndarray:
    member = manifest.layout.members[name]
    if data.startswith(member.npy_header) and len(data) == len(member.npy_header) + member.payload_bytes:
        # The usual case: exactly the header the format prescribes.
        return np.frombuffer(data, dtype=member.dtype, offset=len(member.npy_header)).reshape(member.shape)
    f = io.BytesIO(data)
    np.lib.format.read_magic(f)
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    expected = member.dtype
    if fortran or dtype != expected or tuple(shape) != member.shape:
        raise ValueError(f"field '{name}' is {dtype}{list(shape)}{' (Fortran order)' if fortran else ''}, expected {expected}{list(member.shape)}")
    arr = np.frombuffer(data, dtype=dtype, offset=f.tell())
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"field '{name}' holds {arr.size} values, its header says {list(shape)}")
    return arr.reshape(shape)


def check_shard(storage: Storage, manifest: Manifest, shard: ShardInfo, stats: dict[str, ChannelStats] | None = None) -> ShardReport:
    """Reads one shard completely and reports everything wrong with it.

    Args:
        storage: where the dataset is.
        manifest: its manifest.
        shard: the shard to check.
        stats: if given, the texture and semantic latents of good samples are added to it.
    """
    report = ShardReport(shard.name)
    layout = manifest.layout
    fields = layout.fields
    where = f"shard '{shard.name}'"
    pending: dict[str, list[np.ndarray]] = {TEXTURE: [], SEMANTIC: []}

    def flush():
        if stats is not None:
            for name, part in ((TEXTURE, "texture"), (SEMANTIC, "semantic")):
                if pending[name]:
                    stats[part].update(from_storage(np.stack(pending[name]), manifest.storage_dtype))
                    pending[name] = []

    try:
        raw = storage.open(shard.name)
    except FileNotFoundError:
        report.add(f"{where}: file does not exist")
        return report
    with raw:
        reader = _HashingReader(raw)
        sample: dict[str, Any] = {}
        expect_key = shard.first_index

        def finish_sample():
            nonlocal expect_key
            key = sample_key(expect_key)
            missing = [f for f in fields if f not in sample]
            problem = sample.pop("_error", None)
            if missing and problem is None:
                problem = f"missing field(s) {missing}"
            if problem is None and not 0 <= sample[LABEL] < manifest.num_classes:
                problem = f"label {sample[LABEL]} is outside [0, {manifest.num_classes})"
            if problem is None:
                for name in fields:
                    if name != LABEL and not bool(torch.isfinite(from_storage(sample[name], layout.members[name].storage)).all()):
                        problem = f"field '{name}' contains NaN or inf"
                        break
            if problem is not None:
                report.bad_samples += 1
                report.add(f"{where}, key '{key}': {problem}")
            elif stats is not None:
                pending[TEXTURE].append(sample[TEXTURE])
                pending[SEMANTIC].append(sample[SEMANTIC])
                if len(pending[TEXTURE]) >= _STATS_BATCH:
                    flush()
            report.count += 1
            expect_key += 1
            sample.clear()

        current = None  # key of the sample being collected
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, name = member.name.partition(".")
                    if current is not None and key != current:
                        finish_sample()
                        current = None
                    if current is None:
                        current = key
                        if key != sample_key(expect_key):
                            sample["_error"] = f"found key '{key}' where '{sample_key(expect_key)}' was expected (samples missing or out of order)"
                            if key.isdigit():
                                expect_key = int(key)  # resynchronise so later samples are judged on their own
                    j = expect_key - shard.first_index
                    m = layout.members.get(name)
                    if m is None:
                        sample.setdefault("_error", f"unexpected field '{name}'")
                        continue
                    if member.offset != j * layout.stride + m.offset:
                        sample.setdefault("_error", f"field '{name}' at byte {member.offset}, expected {j * layout.stride + m.offset} (layout mismatch)")
                    data = tar.extractfile(member).read()
                    try:
                        if name == LABEL:
                            sample[LABEL] = int(data.decode().strip())
                        else:
                            sample[name] = _decode_array(data, manifest, name)
                    except (ValueError, UnicodeDecodeError) as err:
                        sample.setdefault("_error", str(err) if name != LABEL else f"field 'cls' is not an integer: {data[:20]!r}")
                if current is not None:
                    finish_sample()
                stopped = tar.offset
            if stopped < shard.count * layout.stride:
                # tarfile ends quietly at an invalid header; say where the archive broke.
                report.add(f"{where}, near key '{sample_key(expect_key)}': invalid tar header at byte {stopped}; the rest of the shard is unreadable")
        except (tarfile.TarError, EOFError, OSError) as err:
            report.add(f"{where}, near key '{sample_key(expect_key)}': unreadable tar ({err}); the shard is truncated or corrupt")
        flush()
        reader.drain()
    if report.count != shard.count:
        report.add(f"{where}: {report.count} samples, the manifest says {shard.count}")
    if reader.bytes != shard.bytes:
        report.add(f"{where}: {reader.bytes} bytes, the manifest says {shard.bytes}")
    if shard.sha256 and reader.sha.hexdigest() != shard.sha256:
        report.add(f"{where}: SHA-256 differs from the manifest's (the file changed or is corrupt)")
    return report


def _for_each_shard(path: str, storage_options, fn: Callable[[Storage, Manifest, ShardInfo], Any], workers: int, progress: bool, desc: str):
    manifest = read_manifest(path, storage_options)
    storage = Storage(path, storage_options)
    with one_torch_thread():
        return _run_per_shard(manifest, storage, fn, workers, progress, desc)


def _run_per_shard(manifest, storage, fn, workers, progress, desc):
    bar = tqdm(total=manifest.num_samples, unit="sample", desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    results = {}
    with bar, cf.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(fn, storage, manifest, shard): shard for shard in manifest.shards}
        for fut in cf.as_completed(futures):
            shard = futures[fut]
            results[shard.name] = fut.result()
            bar.update(shard.count)
    return manifest, storage, [results[s.name] for s in manifest.shards]


def check_dataset(path: str, storage_options: dict | None = None, *, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Checks every shard of a dataset against its manifest.

    Returns:
        ``{"path", "ok", "manifest", "num_samples", "num_shards", "shapes", "bad_samples",
        "errors", "shards": [per-shard reports]}``; ``ok`` is False if anything is wrong.
    """
    manifest, storage, reports = _for_each_shard(path, storage_options, check_shard, workers, progress, "checking shards")
    listed = {s.name for s in manifest.shards}
    errors = []
    try:
        strays = sorted(n for n in storage.sizes() if n.endswith(".tar") and n not in listed)
    except OSError as err:
        strays = []
        errors.append(f"cannot list {path}: {err}")
    if strays:
        errors.append(f"shard files not in the manifest: {strays}")
    return {
        "path": path,
        "ok": not errors and all(r.ok for r in reports),
        "num_samples": manifest.num_samples,
        "samples_found": sum(r.count for r in reports),
        "num_shards": len(manifest.shards),
        "shapes": {k: list(v) for k, v in manifest.shapes.items()},
        "storage_dtype": manifest.storage_dtype,
        "bad_samples": sum(r.bad_samples for r in reports),
        "errors": errors,
        "shards": [r.to_dict() for r in reports],
        "manifest": manifest.to_dict(),
    }


def compute_dataset_stats(path: str, storage_options: dict | None = None, *, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Per-channel mean and std of the texture and semantic latents of a dataset's shards.

    Returns:
        ``{"texture": {"mean", "std"}, "semantic": {...}, "count": samples used, "skipped": bad samples}``.
    """

    def per_shard(storage, manifest, shard):
        stats = {"texture": ChannelStats(manifest.texture_channels), "semantic": ChannelStats(manifest.semantic_channels)}
        return check_shard(storage, manifest, shard, stats), stats

    manifest, _, results = _for_each_shard(path, storage_options, per_shard, workers, progress, "computing statistics")
    merged = {"texture": ChannelStats(manifest.texture_channels), "semantic": ChannelStats(manifest.semantic_channels)}
    for _, stats in results:
        for part in merged:
            merged[part].merge(stats[part])
    h, w = manifest.latent_size
    return {
        **{part: s.to_record() for part, s in merged.items()},
        "count": merged["texture"].count // (h * w),
        "skipped": sum(r.bad_samples for r, _ in results),
    }

