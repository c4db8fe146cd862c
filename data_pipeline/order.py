"""The deterministic orders: how samples are stored, and which sample comes when.

Everything random here is a pure function of integers, built on a keyed
SplitMix64 hash (a bijection on 64-bit words), so the orders are the same on every
machine, numpy and torch version, and in every process:

* **storage order** (:func:`writer_permutation`): the writer stores source sample
  ``perm[i]`` as global index ``i``; consecutive stored samples are therefore an
  i.i.d. draw from the source, whatever order the source was in (ImageNet latents
  come sorted by class).
* **epoch order** (:func:`epoch_order`): per epoch, ONE global sequence of all
  global indices that depends only on ``(seed, epoch)``. It is a seeded shuffle of
  chunks of ``chunk_size`` consecutive stored samples, the chunk boundaries moved by
  a seeded offset each epoch. Consecutive positions are mostly consecutive stored
  samples, so a slice of the sequence is a few contiguous byte ranges; the storage
  order already made every chunk a random sample, so nothing is lost by not
  shuffling inside a chunk (the order inside a batch does not change its gradient).
* **flips** (:func:`flip_choices`): per (seed, epoch, global index).
* **the schedule** (:class:`Schedule`): global batches are contiguous runs of the
  epoch order; rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices of each
  and cuts it into micro-batches. A last partial global batch is dropped so that
  every rank gets the same number of micro-batches per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MASK = (1 << 64) - 1

# Stream tags keep the hashes of different uses independent of each other.
STREAM_WRITE = 0x5772697465  # storage order
STREAM_CHUNKS = 0x4368756E6B  # order of chunks in an epoch
STREAM_OFFSET = 0x4F6666736574  # where chunk boundaries fall in an epoch
STREAM_SAMPLES = 0x53616D706C65  # sample order when chunk_size == 1
STREAM_FLIP = 0x466C6970  # flip choices

DEFAULT_CHUNK_SIZE = 16


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_hash(values: np.ndarray, *key: int) -> np.ndarray:
    """A 64-bit hash of each value under the integer key ``key``.

    For a fixed key it is a bijection of the values, so sorting by it gives a
    permutation without ties.
    """
    with np.errstate(over="ignore"):
        k = np.zeros(1, dtype=np.uint64)
        for word in key:
            k = _splitmix64(k ^ np.array([int(word) & _MASK], dtype=np.uint64))
        return _splitmix64(np.asarray(values, dtype=np.uint64) ^ k)


def _permutation(n: int, *key: int) -> np.ndarray:
    return np.argsort(keyed_hash(np.arange(n, dtype=np.uint64), *key), kind="stable").astype(np.int64)


def writer_permutation(num_samples: int, seed: int) -> np.ndarray:
    """``perm[i]`` = the source index stored as global index ``i``."""
    return _permutation(num_samples, STREAM_WRITE, seed)


def epoch_order(num_samples: int, seed: int, epoch: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """The global sequence of sample indices of one epoch (each index exactly once).

    Args:
        num_samples: dataset size N.
        seed: the run's data seed.
        epoch: epoch number (0, 1, ...).
        chunk_size: consecutive stored samples kept together (1 = a full shuffle).

    Returns:
        int64 array of length N, a permutation of ``range(N)``.
    """
    n = int(num_samples)
    if chunk_size <= 1 or n <= chunk_size:
        return _permutation(n, STREAM_SAMPLES, seed, epoch)
    shift = int(keyed_hash(np.zeros(1), STREAM_OFFSET, seed, epoch)[0] % np.uint64(chunk_size))
    num_chunks = -(-n // chunk_size)
    chunks = _permutation(num_chunks, STREAM_CHUNKS, seed, epoch)
    starts = chunks * chunk_size
    lengths = np.minimum(chunk_size, n - starts)
    first = np.cumsum(lengths) - lengths
    positions = np.arange(n, dtype=np.int64) - np.repeat(first, lengths) + np.repeat(starts, lengths)
    # Moving the boundaries changes which samples share a chunk from epoch to epoch.
    return (positions + shift) % n


def flip_choices(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Whether each sample uses its flipped variant in ``epoch`` (bool array)."""
    return (keyed_hash(np.asarray(indices, dtype=np.uint64), STREAM_FLIP, seed, epoch) >> np.uint64(63)).astype(bool)


@dataclass(frozen=True)
class Schedule:
    """Which positions of the epoch order a rank reads, micro-batch by micro-batch.

    Micro-batches of a rank are numbered ``0, 1, 2, ...`` from the start of epoch 0;
    number ``j`` lies in epoch ``j // micro_per_epoch``.
    """

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    rank: int
    world_size: int

    def __post_init__(self):
        g, m, w = self.global_batch_size, self.micro_batch_size, self.world_size
        if w < 1 or not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} is outside world size {w}")
        if g < 1 or g % w:
            raise ValueError(f"global_batch_size {g} must be a positive multiple of world_size {w}")
        if m < 1 or (g // w) % m:
            raise ValueError(f"micro_batch_size {m} must divide the per-rank batch {g // w} (global {g} / world {w})")
        if self.num_samples < g:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of {g}")

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch; the remainder of N / G is dropped."""
        return self.num_samples // self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    @property
    def micro_per_epoch(self) -> int:
        return self.batches_per_epoch * self.accumulation_steps

    def locate(self, micro: int) -> tuple[int, int, int]:
        """``(epoch, global batch in epoch, micro-batch in global batch)`` of micro-batch ``micro``."""
        epoch, rest = divmod(micro, self.micro_per_epoch)
        batch, step = divmod(rest, self.accumulation_steps)
        return epoch, batch, step

    def positions(self, micro: int) -> tuple[int, int, int]:
        """``(epoch, start, stop)``: micro-batch ``micro`` is ``epoch_order(...)[start:stop]``."""
        epoch, batch, step = self.locate(micro)
        per_rank = self.global_batch_size // self.world_size
        start = batch * self.global_batch_size + self.rank * per_rank + step * self.micro_batch_size
        return epoch, start, start + self.micro_batch_size

    def first_micro(self, epoch: int, samples_in_epoch: int) -> int:
        """The micro-batch number that starts global sample ``samples_in_epoch`` of ``epoch``."""
        if samples_in_epoch % self.global_batch_size:
            raise ValueError(
                f"position {samples_in_epoch} is not a multiple of the global batch size {self.global_batch_size}"
            )
        return epoch * self.micro_per_epoch + (samples_in_epoch // self.global_batch_size) * self.accumulation_steps
