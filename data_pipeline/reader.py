"""The composite-latent loader: deterministic, resumable, world-size independent.

Per epoch there is one global sequence of sample indices (``order.epoch_order``,
a function of seed and epoch only). A global batch of G samples is a contiguous
run of it; rank r of W takes the r-th slice of G/W and cuts it into micro-batches.
So the samples a rank sees are a function of (seed, epoch, rank, world size,
position), and the global batches do not depend on the world size at all.

Reading happens in two stages. Stage 1 (a loader worker, or this process):
the manifest's fixed sample layout turns a micro-batch into byte ranges; because
the epoch order keeps runs of consecutive stored samples together they merge into
a few large ranges, read with one ``preadv`` each (locally, with a ``WILLNEED``
hint for the next micro-batch) or one concurrent batch of ranged GETs, into a
reusable shared-memory slot; headers, labels and values are checked there.
Compact (int8) REPA features are decoded there too, into float16 beside the raw bytes.
Stage 2 (the main process): conversion to float32 and normalisation, straight into
fresh (huge-page or pinned) memory. Workers take whole micro-batches round-robin;
torch's DataLoader returns them in order. :func:`bytes_per_image` says what all this
fetches per image.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import logging
import math
import mmap
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sfd_train.data_pipeline import compact
from sfd_train.data_pipeline.config import DataConfig
from sfd_train.data_pipeline.errors import BadSampleError, ManifestError
from sfd_train.data_pipeline.format import (
    BLOCK,
    FEATURES,
    FEATURES_FLIP,
    LABEL,
    SCALE_OF,
    SEMANTIC,
    SEMANTIC_FLIP,
    TEXTURE,
    TEXTURE_FLIP,
    TORCH_DTYPES,
    SampleLayout,
    member_name_in_header,
    padded,
    sample_key,
)
from sfd_train.data_pipeline.manifest import MANIFEST_NAME, Manifest, read_manifest
from sfd_train.data_pipeline.order import DEFAULT_CHUNK_SIZE, Schedule, epoch_order, flip_choices
from sfd_train.data_pipeline.storage import RetryPolicy, Storage

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_LOOKAHEAD = 2  # micro-batches per worker announced to the kernel ahead of reading
REMOTE_MAX_GAP = 4 << 20


class _Shards:
    """The shards of a dataset as the reader sees them: names, first indices, usable samples."""

    def __init__(self, manifest: Manifest, storage: Storage, on_bad_sample: str):
        self.manifest = manifest
        self.layout = manifest.layout
        self.names = [s.name for s in manifest.shards]
        self.starts = np.array([s.first_index for s in manifest.shards] + [manifest.num_samples], dtype=np.int64)
        self.usable = np.array([s.count for s in manifest.shards], dtype=np.int64)
        self._check(storage, on_bad_sample)

    def _check(self, storage: Storage, on_bad_sample: str) -> None:
        """Compares the shard files with the manifest (one listing, no data read)."""
        sizes = storage.sizes()
        listed = set(self.names)
        strays = sorted(n for n in sizes if n.endswith(".tar") and n not in listed)
        if strays:
            raise ManifestError(f"{storage.root}: shard files not in {MANIFEST_NAME}: {strays[:5]}")
        for i, shard in enumerate(self.manifest.shards):
            if shard.name not in sizes:
                raise ManifestError(f"{storage.root}: shard {shard.name} listed in {MANIFEST_NAME} does not exist")
            size = sizes[shard.name]
            if size > shard.bytes:
                raise ManifestError(f"shard {shard.name} has {size} bytes, {MANIFEST_NAME} says {shard.bytes}")
            if size < shard.bytes:
                whole = size // self.layout.stride
                if whole >= shard.count:
                    logger.warning("shard %s lacks its end-of-archive marker (all samples are present)", shard.name)
                    continue
                key = sample_key(shard.first_index + whole)
                reason = f"shard is truncated: {size} of {shard.bytes} bytes; samples from this key on are missing"
                if on_bad_sample == "error":
                    raise BadSampleError(shard.name, key, reason)
                logger.warning("%s", BadSampleError(shard.name, key, reason))
                # Samples whose bytes are partly present are read and reported one by one.
                self.usable[i] = min(shard.count, -(-size // self.layout.stride))

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard number, index within the shard)`` of each global index."""
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        return shard, indices - self.starts[shard]


@dataclass
class _Piece:
    sample: int
    member: str
    shard: int
    start: int
    stop: int
    buffer_offset: int = -1


@dataclass
class _Plan:
    epoch: int
    indices: np.ndarray
    flips: np.ndarray
    pieces: list[_Piece]
    ranges: list[tuple[str, int, int]]
    offsets: list[int]
    total: int
    missing: dict[int, str]


class _BatchReader:
    """Turns a list of global indices into a batch: plans byte ranges, reads, decodes, checks."""

    def __init__(self, shards: _Shards, storage: Storage, *, seed: int, use_flip: bool, use_features: bool,
                 normalize: bool, on_bad_sample: str, max_gap: int = 0):
        self.shards = shards
        self.storage = storage
        self.seed = seed
        self.use_flip = use_flip
        self.use_features = use_features and shards.manifest.feature_dim is not None
        self.normalize = normalize
        self.on_bad_sample = on_bad_sample
        self.max_gap = max_gap
        m = shards.manifest
        self.layout = shards.layout
        self.dtype = m.storage_dtype
        self.compact = self.layout.compact and self.use_features
        # Whole tar blocks, so that every decoded region (and slot) stays aligned for any view.
        self.decoded_bytes = padded(int(np.prod(self.layout.members[FEATURES].shape)) * 2) if self.compact else 0
        """Bytes set aside for one sample's decoded (float16) features when they are stored compact, else 0."""
        self.c_tex, self.c_sem = m.channels
        self.hw = m.latent_size
        self.mirror_features = self.use_features and not m.has_flipped_features
        # Exponent bits of the stored 16-bit floats; all ones means NaN or inf.
        self.exponent_mask = np.uint16(0x7C00 if self.dtype == "float16" else 0x7F80)
        if normalize:
            tex_mean, tex_std = m.stats_tensors("texture")
            sem_mean, sem_std = m.stats_tensors("semantic")
            self.mean = torch.cat([tex_mean, sem_mean]).unsqueeze(0)
            self.inv_std = (1.0 / torch.cat([tex_std, sem_std])).unsqueeze(0)

    # -- planning -------------------------------------------------------------------------
    def plan(self, indices: np.ndarray, epoch: int, use_flip: bool | None = None) -> _Plan:
        layout = self.layout
        stride = layout.stride
        use_flip = self.use_flip if use_flip is None else use_flip
        flips = flip_choices(self.seed, epoch, indices) if use_flip else np.zeros(len(indices), dtype=bool)
        shard_of, local = self.shards.locate(indices)
        latent_end = layout.latent_block_end
        pieces: list[_Piece] = []
        missing: dict[int, str] = {}
        for i in range(len(indices)):
            s, base = int(shard_of[i]), int(local[i]) * stride
            if local[i] >= self.shards.usable[s]:
                missing[i] = "sample lies beyond the end of the truncated shard"
                continue
            pieces.append(_Piece(i, TEXTURE, s, base, base + latent_end))
            if self.use_features:
                start, stop = layout.feature_span(FEATURES_FLIP if flips[i] and not self.mirror_features else FEATURES)
                pieces.append(_Piece(i, FEATURES, s, base + start, base + stop))
        # Merge touching pieces of a shard into one read; with max_gap > 0 (object
        # stores, where each request costs latency and money) also bridge a gap of
        # unneeded bytes, as long as it is no bigger than the piece after it, so that
        # at most about half of what is fetched is thrown away.
        pieces.sort(key=lambda p: (p.shard, p.start))
        ranges: list[list[Any]] = []
        groups: list[list[_Piece]] = []
        for p in pieces:
            last = ranges[-1] if ranges else None
            if last is not None and last[0] == p.shard and p.start - last[2] <= min(self.max_gap, p.stop - p.start):
                ranges[-1][2] = max(ranges[-1][2], p.stop)
                groups[-1].append(p)
            else:
                ranges.append([p.shard, p.start, p.stop])
                groups.append([p])
        offsets, total = [], 0
        for (_, start, stop), group in zip(ranges, groups):
            offsets.append(total)
            for p in group:
                p.buffer_offset = total + p.start - start
            total += stop - start
        names = self.shards.names
        return _Plan(epoch, indices, flips, pieces, [(names[s], a, b) for s, a, b in ranges], offsets, total, missing)

    def hint(self, plan: _Plan) -> None:
        self.storage.will_need(plan.ranges)

    # -- reading (stage 1: a worker, or this process) ----------------------------------------
    def read(self, plan: _Plan, buffer: "_Buffers") -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
        """Reads ``plan`` into one buffer and checks every sample's headers, label and values.

        No array is copied or converted here: the result points into the buffer (shared
        with the main process when this runs in a loader worker) and :meth:`finish`
        converts it there.

        Returns:
            ``(raw, bad)``: the raw batch and ``(shard, key, reason)`` of every bad sample.

        Raises:
            BadSampleError: the first bad sample, when ``on_bad_sample == "error"``.
        """
        # Compact features are decoded into float16 behind the raw bytes, one region per sample.
        handle, buf = buffer.acquire(plan.total + len(plan.indices) * self.decoded_bytes)
        got = self.storage.read_into(plan.ranges, memoryview(buf), plan.offsets) if plan.ranges else []
        ends = np.array(plan.offsets, dtype=np.int64) + np.array(got, dtype=np.int64)
        range_of = np.searchsorted(np.array(plan.offsets, dtype=np.int64), [p.buffer_offset for p in plan.pieces], side="right") - 1
        n = len(plan.indices)
        bad: dict[int, str] = dict(plan.missing)
        latent_at = np.full(n, -1, dtype=np.int64)
        feature_at = np.full(n, -1, dtype=np.int64)
        for p, r in zip(plan.pieces, range_of):
            if p.buffer_offset + (p.stop - p.start) > ends[r]:
                bad.setdefault(p.sample, "shard ends inside the sample (truncated)")
            elif p.member == TEXTURE:
                latent_at[p.sample] = p.buffer_offset
            else:
                feature_at[p.sample] = p.buffer_offset

        labels = np.zeros(n, dtype=np.int64)
        members = self.layout.members
        for i in range(n):
            if i in bad:
                continue
            reason = self._check_sample(buf, int(plan.indices[i]), int(latent_at[i]), int(feature_at[i]), plan.flips[i])
            if reason is None:
                text = bytes(buf[latent_at[i] + members[LABEL].offset + BLOCK : latent_at[i] + members[LABEL].end])
                try:
                    labels[i] = int(text.rstrip(b"\0"))
                except ValueError:
                    reason = f"field 'cls' is not an integer: {text.rstrip(bytes(1))[:20]!r}"
                else:
                    if not 0 <= labels[i] < self.shards.manifest.num_classes:
                        reason = f"label {labels[i]} is outside [0, {self.shards.manifest.num_classes})"
            if reason is not None:
                bad[i] = reason

        # The 16-bit words of the arrays each sample uses: check values, mirror features.
        words = buf.view(np.uint16)
        m = self.layout.members
        used = {}
        decoded = plan.total  # where the next sample's decoded features go
        for i in range(n):
            if i in bad:
                continue
            f = plan.flips[i]
            used[i] = [
                (m[TEXTURE_FLIP if f else TEXTURE], (latent_at[i] + m[TEXTURE_FLIP if f else TEXTURE].payload_offset) // 2),
                (m[SEMANTIC_FLIP if f else SEMANTIC], (latent_at[i] + m[SEMANTIC_FLIP if f else SEMANTIC].payload_offset) // 2),
            ]
            if self.use_features and not self.compact:
                fm = m[FEATURES_FLIP if f and not self.mirror_features else FEATURES]
                used[i].append((fm, (feature_at[i] + BLOCK + len(fm.npy_header)) // 2))
            for member, at in used[i]:
                values = words[at : at + member.payload_bytes // 2]
                # NaN and inf are the values whose exponent bits are all ones.
                if ((values & self.exponent_mask) == self.exponent_mask).any():
                    bad[i] = f"field '{member.name}' contains NaN or inf"
                    break
            else:
                if self.compact:
                    reason = self._prepare_compact(buf, used[i], int(feature_at[i]), f, decoded)
                    if reason is not None:
                        bad[i] = reason
                    decoded += self.decoded_bytes
                elif self.use_features and f and self.mirror_features:
                    # No stored dino_flip: the features of the mirrored picture are taken to
                    # be the mirrored features (exact for per-patch encoders, close for DINOv2).
                    member, at = used[i][2]
                    rows = words[at : at + member.payload_bytes // 2].reshape(-1, self.hw[1])
                    rows[:] = rows[:, ::-1].copy()

        if self.compact:
            self._decode_compact(buf, used, bad)
        good = np.array([i for i in range(n) if i not in bad], dtype=np.int64)
        out: dict[str, Any] = {
            "raw": handle,
            "tex_at": np.array([used[i][0][1] for i in good], dtype=np.int64),
            "sem_at": np.array([used[i][1][1] for i in good], dtype=np.int64),
            "y": torch.from_numpy(labels[good]),
            "index": torch.from_numpy(plan.indices[good].astype(np.int64)),
        }
        if self.use_features:
            # The float16 index of each sample's features: stored, or decoded from compact storage.
            out["dino_at"] = np.array([used[i][-1][1] for i in good], dtype=np.int64)
        records = self._records(plan.indices, bad)
        if records and self.on_bad_sample == "error":
            buffer.release(handle)
            raise BadSampleError(*records[0])
        return out, records

    def _prepare_compact(self, buf: np.ndarray, used: list, feature_at: int, flip: bool, dst: int) -> str | None:
        """Checks a sample's compact features, mirrors them where that stands in for dino_flip, and
        appends ``(values member, byte offset)``, ``(scale member, byte offset)`` and ``(values member,
        float16 index of its decoded features at byte dst)`` to ``used`` for :meth:`_decode_compact`.

        Returns:
            What is wrong, or None.
        """
        m = self.layout.members
        fm = m[FEATURES_FLIP if flip and not self.mirror_features else FEATURES]
        sm = m[SCALE_OF[fm.name]]
        values_at = feature_at + fm.payload_offset - fm.offset
        scale_at = feature_at + sm.payload_offset - fm.offset
        scales = buf[scale_at : scale_at + sm.payload_bytes].view(np.float32)
        if not np.isfinite(scales).all():
            return f"field '{sm.name}' contains NaN or inf"
        if flip and self.mirror_features:
            # As for float features (see read): mirror each row of values and of the token scales.
            w = self.hw[1]
            rows = buf[values_at : values_at + fm.payload_bytes].reshape(-1, w)
            rows[:] = rows[:, ::-1].copy()
            tokens = scales[fm.shape[0] :].reshape(-1, w)
            tokens[:] = tokens[:, ::-1].copy()
        used += [(fm, values_at), (sm, scale_at), (fm, dst // 2)]
        return None

    def _decode_compact(self, buf: np.ndarray, used: dict[int, list], bad: dict[int, str]) -> None:
        """Decodes the compact features of every good sample into float16 (see :meth:`_prepare_compact`),
        here in the loader worker: the trainer's process then converts them as it converts float16
        storage (docs/data.md, "Compact REPA features")."""
        fm = self.layout.members[FEATURES]
        d, hw = fm.shape[0], fm.shape[1] * fm.shape[2]
        raw = torch.from_numpy(buf)
        values, scales, out = raw.view(torch.int8), raw.view(torch.float32), raw.view(torch.float16)
        limit = float(np.finfo(np.float16).max)
        with _one_thread():
            scratch = self._decode_scratch(d, hw)
            for i, entries in used.items():
                if i in bad:
                    continue
                (_, values_at), (_, scale_at), (_, at) = entries[2:]
                s = scales[scale_at // 4 : scale_at // 4 + d + hw]
                target = out[at : at + d * hw].view(d, hw)
                compact.dequantize_into(values[values_at : values_at + d * hw].view(d, hw), s, target, scratch)
                if compact.LEVELS * float(s[:d].max()) * float(s[d:].max()) > limit and not torch.isfinite(target).all():
                    bad[i] = f"field '{fm.name}': values beyond the float16 range"

    def _decode_scratch(self, d: int, hw: int) -> torch.Tensor:
        # One float32 work area per reader (per worker process after fork), reused for every sample.
        scratch = getattr(self, "_scratch", None)
        if scratch is None or scratch.shape != (d, hw):
            scratch = self._scratch = torch.empty(d, hw)
        return scratch

    def _records(self, indices: np.ndarray, bad: dict[int, str]) -> list[tuple[str, str, str]]:
        records = []
        for i in sorted(bad):
            index = int(indices[i])
            shard_no = int(self.shards.locate(np.array([index]))[0][0])
            records.append((self.shards.names[shard_no], sample_key(index), bad[i]))
        return records

    def _check_sample(self, buf: np.ndarray, index: int, latent_at: int, feature_at: int, flip: bool) -> str | None:
        """Checks the tar headers and .npy headers of one sample; returns what is wrong, or None."""
        key = sample_key(index).encode()
        members = self.layout.members
        to_check = [(members[name], latent_at) for name in (TEXTURE, TEXTURE_FLIP, SEMANTIC, SEMANTIC_FLIP, LABEL)]
        if feature_at >= 0:
            fm = members[FEATURES_FLIP if flip and not self.mirror_features else FEATURES]
            to_check.append((fm, feature_at - fm.offset))
            if self.compact:
                to_check.append((members[SCALE_OF[fm.name]], feature_at - fm.offset))
        for m, base in to_check:
            header = buf[base + m.offset : base + m.offset + BLOCK]
            name = member_name_in_header(header)
            expected = key + b"." + m.name.encode()
            if name != expected:
                if name.startswith(key + b"."):
                    return f"field '{m.name}' is missing (found '{name.decode(errors='replace')}' in its place)"
                return f"expected member '{expected.decode()}', found {name[:40]!r} (corrupt or misaligned shard)"
            if m.npy_header:
                start = base + m.offset + BLOCK
                if bytes(buf[start : start + len(m.npy_header)]) != m.npy_header:
                    return f"field '{m.name}' {_describe_npy(bytes(buf[start : start + len(m.npy_header)]), m, self.layout)}"
        return None

    # -- converting (stage 2: the main process) -------------------------------------------------
    def finish(self, raw: dict[str, Any], buffer: "_Buffers", pin: bool = False) -> dict[str, torch.Tensor]:
        """Converts a raw batch from :meth:`read` into the float32 (normalised) batch.

        Outputs go straight into pinned memory when ``pin``, else into fresh memory
        backed by huge pages where the OS allows (first-touch page faults of 4 KiB
        pages otherwise cost more than the conversion itself).
        """
        try:
            with _one_thread():
                return self._finish(raw, buffer.tensor(raw["raw"]), pin)
        finally:
            buffer.release(raw["raw"])  # the batch holds copies; the buffer can be refilled

    def _finish(self, raw: dict[str, Any], data: torch.Tensor, pin: bool) -> dict[str, torch.Tensor]:
        words = data.view(TORCH_DTYPES[self.dtype])
        b = len(raw["index"])
        h, w = self.hw
        hw = h * w
        x = _alloc_output((b, self.c_tex + self.c_sem, h, w), pin)
        flat = x.view(b, -1)
        n_tex, n_sem = self.c_tex * hw, self.c_sem * hw
        for row, (t, s) in enumerate(zip(raw["tex_at"].tolist(), raw["sem_at"].tolist())):
            flat[row, :n_tex].copy_(words[t : t + n_tex])
            flat[row, n_tex:].copy_(words[s : s + n_sem])
        if self.normalize:
            x.sub_(self.mean).mul_(self.inv_std)
        batch = {"x": x, "y": raw["y"], "index": raw["index"]}
        if pin:
            batch.update(y=raw["y"].pin_memory(), index=raw["index"].pin_memory())
        if self.use_features:
            d = self.shards.manifest.feature_dim
            n = d * hw
            feats = _alloc_output((b, d, h, w), pin)
            flat = feats.view(b, -1)
            # Compact features were decoded into float16 by stage 1: the same copy as float16 storage.
            source = data.view(torch.float16) if self.compact else words
            for row, at in enumerate(raw["dino_at"].tolist()):
                flat[row].copy_(source[at : at + n])
            batch["dino"] = feats
        return batch


def _describe_npy(header: bytes, member, layout) -> str:
    try:
        f = io.BytesIO(header + bytes(64))
        np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        order = " (Fortran order)" if fortran else ""
        return f"is {dtype}{list(shape)}{order}, expected {member.dtype}{list(member.shape)}"
    except Exception:  # noqa: BLE001 - any failure means the header is garbage
        return "is not a valid .npy header"


_HUGE_PAGE = 2 << 20


@contextlib.contextmanager
def _one_thread():
    """Runs torch ops on the calling thread only.

    The conversions are many small copies; torch's OpenMP pool gains nothing on
    them and, on a busy machine, its spinning threads made them 30x slower.
    """
    previous = torch.get_num_threads()
    if previous > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous > 1:
            torch.set_num_threads(previous)


def _alloc_output(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """A fresh float32 tensor for a batch: pinned, or (if large) on transparent huge pages."""
    if pin:
        return torch.empty(shape, dtype=torch.float32, pin_memory=True)
    nbytes = math.prod(shape) * 4
    if nbytes < 4 * _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=torch.float32)
    # Private anonymous memory, 2 MiB-aligned and advised for huge pages: filling it
    # costs a page fault per 2 MiB instead of per 4 KiB. Freed when the tensor is.
    mm = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    offset = -address % _HUGE_PAGE
    return torch.frombuffer(mm, dtype=torch.float32, count=math.prod(shape), offset=offset).view(shape)


class _Buffers:
    """Where raw batches are read to: one reusable buffer, for reading in this process."""

    def __init__(self):
        self._buffer = np.empty(0, dtype=np.uint8)

    def acquire(self, nbytes: int) -> tuple[Any, np.ndarray]:
        if len(self._buffer) < nbytes:
            self._buffer = np.empty(nbytes, dtype=np.uint8)
        return nbytes, self._buffer[:nbytes]

    def tensor(self, handle: Any) -> torch.Tensor:
        return torch.from_numpy(self._buffer[:handle])

    def release(self, handle: Any) -> None:
        pass


class _SharedSlots(_Buffers):
    """Fixed shared-memory slots that each loader worker fills and the main process empties.

    Passing every batch through a fresh shared-memory tensor (what DataLoader does)
    costs a page fault per 4 KiB in both processes, more than the read itself. These
    slots are mapped once, before the workers fork, and reused: worker ``w`` fills
    its slots in turn, waiting until the main process has released a slot (after
    converting its batch) before filling it again. A batch too big for a slot (or a
    worker started without fork) gets a fresh shared tensor instead.
    """

    def __init__(self, workers: int, slots_per_worker: int, slot_bytes: int):
        self.workers, self.per_worker, self.slot_bytes = workers, slots_per_worker, slot_bytes
        count = workers * slots_per_worker
        self.header = -(-count // 4096) * 4096
        # MAP_SHARED | MAP_ANONYMOUS: inherited by forked workers, no file, no name to clean up.
        self.mm = mmap.mmap(-1, self.header + count * slot_bytes)
        self.flags = np.frombuffer(self.mm, dtype=np.uint8, count=count)
        self._pid = os.getpid()
        self._filled = 0
        self._fallback: dict[int, torch.Tensor] = {}

    def acquire(self, nbytes: int) -> tuple[Any, np.ndarray]:
        info = get_worker_info()
        if info is None or os.getpid() == self._pid or nbytes > self.slot_bytes:
            t = _shared_tensor(nbytes)
            return ("tensor", t), t.numpy()
        slot = info.id * self.per_worker + self._filled % self.per_worker
        self._filled += 1
        waited = 0.0
        while self.flags[slot]:
            time.sleep(0.0002)
            waited += 0.0002
            if waited > 600:
                raise RuntimeError("loader worker waited 10 minutes for a free buffer slot; the main process stopped consuming")
        self.flags[slot] = 1
        start = self.header + slot * self.slot_bytes
        return ("slot", slot, nbytes), np.frombuffer(self.mm, dtype=np.uint8, count=nbytes, offset=start)

    def tensor(self, handle: Any) -> torch.Tensor:
        if handle[0] == "tensor":
            return handle[1]
        _, slot, nbytes = handle
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes, offset=self.header + slot * self.slot_bytes)

    def release(self, handle: Any) -> None:
        if handle[0] == "slot":
            self.flags[handle[1]] = 0


def _shared_tensor(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in shared memory, sent to the main process without a copy."""
    proto = torch.empty(0, dtype=torch.uint8)
    storage = proto._typed_storage()._new_shared(max(1, nbytes), device=proto.device)
    return proto.new(storage)[:nbytes]


class _MicroBatchStream(IterableDataset):
    """The micro-batches of one rank from number ``start`` on, split round-robin over workers."""

    def __init__(self, reader: _BatchReader, schedule: Schedule, seed: int, chunk_size: int, start: int, read_ahead: bool,
                 buffers: _Buffers):
        self.reader = reader
        self.buffers = buffers
        self.schedule = schedule
        self.seed = seed
        self.chunk_size = chunk_size
        self.start = start
        self.read_ahead = read_ahead
        self._orders: dict[int, np.ndarray] = {}

    def _indices(self, micro: int) -> tuple[int, np.ndarray]:
        epoch, lo, hi = self.schedule.positions(micro)
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_order(self.schedule.num_samples, self.seed, epoch, self.chunk_size)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return epoch, order[lo:hi]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], list]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        micro = self.start + worker
        # This worker's next micro-batches are known in advance: announcing them to the
        # kernel keeps the disk busy while this one is read and converted.
        upcoming = collections.deque(self.reader.plan(*reversed(self._indices(micro + k * workers))) for k in range(1 + _LOOKAHEAD))
        if self.read_ahead:
            for plan in upcoming:
                self.reader.hint(plan)
        while True:
            plan = upcoming.popleft()
            yield self.reader.read(plan, self.buffers)
            micro += workers
            upcoming.append(self.reader.plan(*reversed(self._indices(micro + _LOOKAHEAD * workers))))
            if self.read_ahead:
                self.reader.hint(upcoming[-1])


class CompositeLatentLoader:
    """Batches of composite latents from sfd-data shards, forever, deterministically.

    Yields dicts: ``x`` float32 (B, C_tex + C_sem, H, W) texture channels first
    (each part normalised with its own manifest statistics when ``normalize``),
    ``y`` int64 (B,), ``dino`` float32 (B, D, H, W) when the shards have features
    and they are requested, ``index`` int64 global sample indices. B is
    ``micro_batch_size`` except where bad samples were skipped.

    Args:
        path: dataset folder or fsspec URL (``s3://bucket/prefix``).
        global_batch_size: samples per optimizer step over all ranks (G).
        micro_batch_size: samples per rank per forward (M); must divide G / world_size.
        rank: this rank's data-parallel rank.
        world_size: number of data-parallel ranks.
        seed: data seed (epoch order and flips).
        num_workers: loader worker processes (0 = read in this process).
        use_flip: pick the stored flipped variant per (seed, epoch, sample).
        use_repa_features: yield ``dino`` when the shards have it.
        normalize: normalise with the manifest's per-channel statistics.
        on_bad_sample: ``"error"`` raises :class:`BadSampleError`; ``"skip"`` drops the
            sample, logs it once and counts it in :attr:`bad_samples`.
        pin_memory: pin batches for the device (ignored, with a warning, without an accelerator).
        chunk_size: consecutive stored samples kept together in the epoch order;
            None = 16 for shuffled datasets, 1 (full shuffle) otherwise.
        prefetch_factor: micro-batches each worker prepares ahead.
        storage_options: fsspec options for URLs.
        retry: backoff policy for transient storage errors.
        read_ahead: hint the kernel to read the next micro-batch while decoding this one (local files).
        max_gap: largest run of unneeded bytes (e.g. the unused dino variant) bridged to merge
            two reads; None = 0 for local files, 4 MiB for URLs.
        direct_s3: read ``s3://`` shards with presigned ranged GETs straight into the batch
            buffer (see ``s3direct.py``); False = every read through s3fs.
        holdout_shards: the dataset's last this many shards are never yielded (an evaluation
            reads them with :meth:`read_samples`).
    """

    def __init__(self, path: str, *, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, num_workers: int, use_flip: bool = True, use_repa_features: bool = True,
                 normalize: bool = True, on_bad_sample: str = "error", pin_memory: bool = False,
                 chunk_size: int | None = None, prefetch_factor: int = 2,
                 storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None,
                 read_ahead: bool = True, max_gap: int | None = None, direct_s3: bool = True, holdout_shards: int = 0):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.path = str(path)
        self.storage = Storage(self.path, storage_options, retry or RetryPolicy(), direct_s3=direct_s3)
        self.manifest = read_manifest(self.path, storage_options)
        shards = _Shards(self.manifest, self.storage, on_bad_sample)
        if chunk_size is None:
            chunk_size = DEFAULT_CHUNK_SIZE if self.manifest.shuffled else 1
            if not self.manifest.shuffled:
                logger.warning("%s was written without shuffling; reading samples in a full random order (slower)", self.path)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.read_ahead = read_ahead
        self.num_samples = self._training_samples(holdout_shards)
        """Samples this loader draws from: all, or those before the held-out shards."""
        self.schedule = Schedule(self.num_samples, global_batch_size, micro_batch_size, rank, world_size)
        self._reader = _BatchReader(shards, self.storage, seed=self.seed, use_flip=use_flip,
                                    use_features=use_repa_features, normalize=normalize, on_bad_sample=on_bad_sample,
                                    max_gap=(0 if self.storage.is_local else REMOTE_MAX_GAP) if max_gap is None else max_gap)
        self.pin_memory = bool(pin_memory)
        if self.pin_memory and not (hasattr(torch, "accelerator") and torch.accelerator.is_available()):
            logger.warning("pin_memory=True but no accelerator is present; batches are not pinned")
            self.pin_memory = False
        self.bad_samples = 0
        """Samples skipped so far (``on_bad_sample="skip"``)."""
        self._logged_bad: set[tuple[str, str]] = set()
        self._micro = 0
        self._iter: Iterator | None = None
        self._loader: DataLoader | None = None
        self._buffers: _Buffers = _Buffers()

    def _training_samples(self, holdout_shards: int) -> int:
        shards = self.manifest.shards
        if not holdout_shards:
            return self.manifest.num_samples
        if holdout_shards >= len(shards):
            raise ValueError(f"{self.path}: holding out {holdout_shards} shard(s) leaves none of its {len(shards)} to "
                             "train on")
        return shards[-holdout_shards].first_index

    def read_samples(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The samples with these global indices, not flipped, in order, read in this process (the
        loader's position is unchanged)."""
        buffers = _Buffers()
        raw, bad = self._reader.read(self._reader.plan(np.asarray(indices, dtype=np.int64), 0, use_flip=False), buffers)
        for shard, key, reason in bad:
            logger.warning("skipped bad sample in shard '%s', key '%s': %s", shard, key, reason)
        return self._reader.finish(raw, buffers)

    # -- properties the trainer reads ------------------------------------------------------
    @property
    def channels(self) -> tuple[int, int]:
        """``(C_tex, C_sem)``."""
        return self.manifest.channels

    @property
    def feature_dim(self) -> int | None:
        """Width D of the yielded REPA features, or None when none are yielded."""
        return self.manifest.feature_dim if self._reader.use_features else None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        return self.schedule.batches_per_epoch

    @property
    def accumulation_steps(self) -> int:
        return self.schedule.accumulation_steps

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> "CompositeLatentLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start(self._micro)
        raw, bad = next(self._iter)
        batch = self._reader.finish(raw, self._buffers, pin=self.pin_memory)
        self._micro += 1
        for shard, key, reason in bad:
            self.bad_samples += 1
            if (shard, key) not in self._logged_bad:
                self._logged_bad.add((shard, key))
                logger.warning("skipped bad sample in shard '%s', key '%s': %s", shard, key, reason)
        return batch

    def _start(self, micro: int) -> Iterator:
        if self.num_workers == 0:
            self._buffers = _Buffers()
        else:
            # A slot holds the largest raw batch a plan can need (twice that where gaps
            # are bridged) and any decoded features; one more slot per worker than it
            # can have in flight.
            reader = self._reader
            slot = self.schedule.micro_batch_size * (reader.layout.stride * (2 if reader.max_gap else 1) + reader.decoded_bytes)
            self._buffers = _SharedSlots(self.num_workers, self.prefetch_factor + 2, slot)
        stream = _MicroBatchStream(self._reader, self.schedule, self.seed, self.chunk_size, micro, self.read_ahead, self._buffers)
        if self.num_workers == 0:
            return iter(stream)
        # Pinning happens in finish(), which writes the converted batch straight into pinned memory.
        self._loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=False,
                                  prefetch_factor=self.prefetch_factor, multiprocessing_context=_worker_context(),
                                  worker_init_fn=_shield_worker_from_stop_signals)
        return iter(self._loader)

    def close(self) -> None:
        """Stops the worker processes (they are restarted on the next batch)."""
        it, self._iter, self._loader = self._iter, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned.

        At a global-batch boundary (where the trainer checkpoints) it is the same on
        every rank and for any world size, so it can be loaded by a run with a
        different number of ranks.
        """
        epoch, batch, step = self.schedule.locate(self._micro)
        g = self.schedule.global_batch_size
        state = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "global_batch_size": g,
            "epoch": epoch,
            "samples_in_epoch": batch * g,
            "samples_seen": (epoch * self.schedule.batches_per_epoch + batch) * g,
        }
        if step:
            # Inside a global batch: only meaningful for the same micro-batch split.
            state.update(micro_in_batch=step, world_size=self.schedule.world_size, micro_batch_size=self.schedule.micro_batch_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from ``state`` (from :meth:`state_dict`, possibly of another world size).

        Raises:
            ValueError: the state belongs to another dataset, seed or chunking, or
                cannot be expressed with this loader's batch sizes.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, mine in (("seed", self.seed), ("num_samples", self.num_samples), ("chunk_size", self.chunk_size)):
            if state[key] != mine:
                raise ValueError(f"data loader state has {key}={state[key]}, this loader has {key}={mine}; the sample order would differ")
        try:
            micro = self.schedule.first_micro(int(state["epoch"]), int(state["samples_in_epoch"]))
        except ValueError as err:
            raise ValueError(f"cannot resume: {err}") from None
        step = int(state.get("micro_in_batch", 0))
        if step:
            if (state["world_size"], state["micro_batch_size"], state["global_batch_size"]) != (
                self.schedule.world_size, self.schedule.micro_batch_size, self.schedule.global_batch_size):
                raise ValueError("the state was saved inside a global batch; it can only be resumed with the same world size and batch sizes")
            micro += step
        self.close()
        self._micro = micro


def _worker_context():
    # The shared slots are inherited through fork; elsewhere workers fall back to
    # DataLoader's per-batch shared memory (see _SharedSlots).
    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


# Signals that ask the whole job to stop. The trainer checkpoints on them (see
# sfd_train.engine.preemption); a loader worker must outlive them until the trainer
# has saved, because a worker killed under the trainer makes torch's DataLoader raise
# in the trainer's main thread, wherever it is, a checkpoint save included.
_JOB_STOP_SIGNALS = ("SIGTERM", "SIGINT")


def _shield_worker_from_stop_signals(worker_id: int) -> None:
    """Loader workers leave stopping to the trainer.

    torchrun signals each rank's whole process group, Slurm every process of the step
    and a terminal's Ctrl-C the foreground group, so a worker hears the job's stop
    signals as well as the trainer does. Here SIGUSR2 is ignored, and SIGTERM/SIGINT
    are taken by a thread that honours them only from the worker's own parent (the
    DataLoader's ``terminate()`` at shutdown) and ignores them from anyone else. A
    worker whose trainer has died exits by itself (torch's worker loop watches its
    parent), so none is left behind.
    """
    import signal
    import threading

    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    stops = {getattr(signal, name) for name in _JOB_STOP_SIGNALS}
    # Blocked in this thread before any other starts, so every thread inherits the mask
    # and only sigwaitinfo() below receives them (with the sender's pid).
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    parent = os.getppid()

    def wait_for_parent_stop() -> None:
        while True:
            info = signal.sigwaitinfo(stops)
            if info.si_pid == parent:
                os._exit(128 + info.si_signo)

    threading.Thread(target=wait_for_parent_stop, name="sfd-stop-signals", daemon=True).start()


def build_loader(data_config: DataConfig, *, global_batch_size: int, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, **overrides: Any) -> CompositeLatentLoader:
    """A :class:`CompositeLatentLoader` configured by ``data_config``.

    ``data.path == "synthetic"`` writes the built-in synthetic dataset on first use
    (into ``data.synthetic_dir``, see :func:`~.synthetic.ensure_synthetic_dataset`).
    Keyword ``overrides`` replace any loader argument (e.g. ``pin_memory=True``).
    """
    path = data_config.path
    if not path:
        raise ValueError("data.path is empty: give a dataset folder, an s3:// URL, or 'synthetic'")
    if path == "synthetic":
        from sfd_train.data_pipeline.synthetic import ensure_synthetic_dataset  # noqa: PLC0415 - only when asked for

        path = ensure_synthetic_dataset(data_config.synthetic_dir or None)
    kwargs: dict[str, Any] = dict(
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
        seed=seed, num_workers=data_config.num_workers, use_flip=data_config.use_flip,
        use_repa_features=data_config.use_repa_features, normalize=data_config.normalize,
        on_bad_sample=data_config.on_bad_sample, chunk_size=data_config.chunk_size,
        prefetch_factor=data_config.prefetch_factor, storage_options=dict(data_config.storage_options),
        retry=RetryPolicy(attempts=data_config.read_attempts), direct_s3=data_config.direct_s3,
    )
    kwargs.update(overrides)
    return CompositeLatentLoader(path, **kwargs)


def bytes_per_image(data: Manifest | SampleLayout, *, use_features: bool = True, use_flip: bool = True,
                    remote: bool = False, run_length: int = DEFAULT_CHUNK_SIZE) -> float:
    """Bytes the loader fetches per image, on average: what an image costs in data bandwidth.

    Every sample's latents (both variants) and label are one contiguous block, always read; with
    ``use_features`` the feature variant the sample uses follows (with its scales when stored
    compact). Locally (``remote=False``) nothing else is read. From object storage the reader
    bridges a gap of unneeded bytes no bigger than the piece after it (:data:`REMOTE_MAX_GAP`), so
    some unused bytes are fetched too: this counts them as :meth:`_BatchReader.plan` does, for a
    flip drawn with probability 1/2 and runs of ``run_length`` consecutive stored samples (the
    epoch order's chunks).

    Args:
        data: a dataset's manifest (its fields, dtypes and ``dino_storage``), or a layout, e.g.
            :meth:`.SampleLayout.for_sizes` from a config's shapes when no data is at hand.
        use_features, use_flip: as the loader's arguments of the same names.
        remote: reading from an object store (``s3://``) rather than a file system.
        run_length: consecutive stored samples per read run (1 = fully random order).

    Returns:
        Mean bytes per image (the latent block is a few hundred bytes of tar and .npy headers
        more than the arrays themselves).
    """
    layout = data.layout if isinstance(data, Manifest) else data
    block = layout.latent_block_end
    has_features = use_features and FEATURES in layout.members
    if not has_features:
        if not remote:
            return float(block)
        # Without features the pieces are the latent blocks; the features between them are a gap.
        gap = layout.stride - block
        bridged = gap <= min(REMOTE_MAX_GAP, block)
        return float(block + (gap if bridged else 0) * (run_length - 1) / run_length)
    start, stop = layout.feature_span(FEATURES)
    span = stop - start
    if FEATURES_FLIP not in layout.members or not use_flip:
        # One variant (mirrored when flipped): it follows the latents directly.
        tail = layout.stride - stop  # the stored but unused dino_flip, if any
        if not remote or tail == 0:
            return float(block + span)
        bridged = tail <= min(REMOTE_MAX_GAP, block)
        return float(block + span + (tail if bridged else 0) * (run_length - 1) / run_length)
    flip_start, flip_stop = layout.feature_span(FEATURES_FLIP)
    flip_span = flip_stop - flip_start
    needed = block + 0.5 * (span + flip_span)
    if not remote:
        return needed
    # A flipped sample: the unused dino lies between the latents and dino_flip. An unflipped one:
    # the unused dino_flip lies between it and the next sample's latents.
    within = span if span <= min(REMOTE_MAX_GAP, flip_span) else 0
    between = flip_span if flip_span <= min(REMOTE_MAX_GAP, block) else 0
    return float(needed + 0.5 * within + 0.5 * between * (run_length - 1) / run_length)
