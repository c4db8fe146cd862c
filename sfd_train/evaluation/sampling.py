"""Sampling at scale: ``sfd-sample CHECKPOINT --num N --out DIR`` on any number of ranks.

Sample ``i``'s noise and label depend on ``(seed, i)`` alone: its noise comes from a
generator seeded by both, its label is ``i mod classes`` (balanced: 50 per class for 50,000
samples over ImageNet's 1,000) or, with ``random_labels``, a draw from that generator. The
samples are cut into chunks; chunk c belongs to rank c mod world size and is always sampled
in the same batches, so the set does not depend on the number of ranks. The adaptive dopri5
solver makes its steps per batch, so with it the set does depend on the batch size; the fixed
grids do not. A finished chunk is a file (written under a temporary name, then renamed), so a
restarted job skips what is done. Rank 0 finally streams the chunks into ``DIR/samples.npz`` in
ADM's layout (``arr_0``: N x H x W x 3 uint8, plus ``labels``) without holding them in memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from sfd_train.data_pipeline.writer import claim_plan
from sfd_train.evaluation.decode import Decoder, to_uint8
from sfd_train.evaluation.sources import SAMPLES_FILE

logger = logging.getLogger("sfd_train")

CHUNKS = "chunks"
PLAN = "plan.json"


@dataclass
class SamplingJob:
    """What to sample: how many, which labels, in what pieces."""

    num: int
    seed: int = 0
    random_labels: bool = False
    chunk: int = 1000
    batch_size: int = 64
    png: bool = False


def sample_seed(seed: int, index: int, stream: int) -> int:
    """The generator seed of sample ``index`` for ``stream`` (0: noise, 1: label)."""
    return (seed * 1_000_003 + index * 7_919 + stream * 104_729 + 12_345) % (2**63 - 1)


def noise_and_labels(job: SamplingJob, indices: np.ndarray, shape: tuple[int, ...], classes: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial noise (B, *shape) and labels (B,) of the samples ``indices``."""
    noise = torch.empty((len(indices), *shape))
    labels = torch.empty(len(indices), dtype=torch.long)
    for row, index in enumerate(indices):
        noise[row] = torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(job.seed, int(index), 0)))
        if job.random_labels:
            generator = torch.Generator().manual_seed(sample_seed(job.seed, int(index), 1))
            labels[row] = int(torch.randint(classes, (1,), generator=generator))
        else:
            labels[row] = int(index) % classes
    return noise.to(device), labels.to(device)


def _chunk_path(out: str, chunk: int) -> str:
    return os.path.join(out, CHUNKS, f"chunk_{chunk:06d}.npz")


def sample_to_folder(sample_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], decoder: Decoder,
                     job: SamplingJob, out: str, *, shape: tuple[int, ...], classes: int, texture_channels: int,
                     device: torch.device, settings: dict[str, Any], rank: int = 0, world: int = 1,
                     barrier: Callable[[], None] = lambda: None, progress: bool = True) -> str | None:
    """Samples ``job.num`` images into ``out``; returns the path of ``samples.npz`` on rank 0.

    Args:
        sample_batch: ``(noise, labels) -> latents`` (the sampler with its settings and guidance).
        decoder: texture part -> images in [0, 1].
        settings: what produced the samples (written to ``plan.json``; a restart must match it).
    """
    os.makedirs(os.path.join(out, CHUNKS), exist_ok=True)
    plan = {"num": job.num, "seed": job.seed, "random_labels": job.random_labels, "chunk": job.chunk,
            "batch_size": job.batch_size, **settings}
    plan_path = os.path.join(out, PLAN)
    if rank == 0:
        differing = claim_plan(plan_path, plan)
        if differing:
            raise ValueError(f"{out} holds samples made with other settings ({', '.join(differing)} differ); "
                             "use another --out or delete it")
    barrier()
    chunks = [c for c in range(-(-job.num // job.chunk)) if c % world == rank and not os.path.exists(_chunk_path(out, c))]
    todo = sum(min(job.chunk, job.num - c * job.chunk) for c in chunks)
    bar = tqdm(total=todo * world, unit="img", desc="sampling", disable=not progress or rank != 0,
               file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    with bar:
        for chunk in chunks:
            indices = np.arange(chunk * job.chunk, min((chunk + 1) * job.chunk, job.num))
            images, labels = [], []
            for lo in range(0, len(indices), job.batch_size):
                batch = indices[lo:lo + job.batch_size]
                noise, y = noise_and_labels(job, batch, shape, classes, device)
                with torch.no_grad():
                    latents = sample_batch(noise, y)
                    if not torch.isfinite(latents).all():
                        raise ValueError(f"sampling gave NaN or inf latents for samples {batch[0]}..{batch[-1]}: the "
                                         "weights hold NaN, or the guidance or solver settings diverge")
                    images.append(to_uint8(decoder(latents[:, :texture_channels])))
                labels.append(y.cpu().numpy())
                bar.update(len(batch) * world)
            _write_chunk(out, chunk, indices, np.concatenate(images), np.concatenate(labels), job.png)
    if rank == 0 and todo:
        rate = todo * world / max(time.perf_counter() - started, 1e-9)
        logger.info(f"sampled {todo * world} images at {rate:.1f} images/s over {world} rank(s)")
    barrier()
    return assemble(out, job.num, job.chunk) if rank == 0 else None


def _write_chunk(out: str, chunk: int, indices: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 png: bool) -> None:
    if png:
        from PIL import Image

        folder = os.path.join(out, "png")
        os.makedirs(folder, exist_ok=True)
        for index, image in zip(indices, images):
            Image.fromarray(image).save(os.path.join(folder, f"{index:06d}.png"))
    path = _chunk_path(out, chunk)
    np.savez(path + ".tmp.npz", images=images, labels=labels, indices=indices)
    os.replace(path + ".tmp.npz", path)


def assemble(out: str, num: int, chunk: int) -> str:
    """Streams the chunks, in order, into ``samples.npz`` (``arr_0``, ``labels``)."""
    path = os.path.join(out, SAMPLES_FILE)
    first = np.load(_chunk_path(out, 0))
    shape = (num, *first["images"].shape[1:])
    labels = []
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for c in range(-(-num // chunk)):
                with np.load(_chunk_path(out, c)) as data:
                    member.write(np.ascontiguousarray(data["images"]).tobytes())
                    labels.append(data["labels"])
        with archive.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.concatenate(labels).astype(np.int64))
    os.replace(tmp, path)
    return path
