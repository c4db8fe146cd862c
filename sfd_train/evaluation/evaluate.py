"""``sfd-eval``: features of two sets (batched, cached for the reference, split over ranks), then the metrics.

Under torchrun every rank computes the features of its share of the batches. Rank 0 gathers
them and computes the metrics (they need all features at once). Features of a reference image
set are cached in ``--cache`` (default ``~/.cache/sfd_train/eval``), keyed by the file's path, size
and modification time and by the weights file, so comparing many sample sets against one reference
computes its features once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from sfd_train.evaluation.metrics import (
    IS_SPLIT,
    GaussianStats,
    frechet_distance,
    inception_score,
    precision_recall,
)
from sfd_train.evaluation.sources import EvalInputError, ImageSet, StatsOnly, open_input

logger = logging.getLogger("sfd_train")

Features = dict[str, np.ndarray]
FeatureFn = Callable[[np.ndarray], Features]


def _default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sfd_train", "eval")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def compute_features(images: ImageSet, features: FeatureFn, batch_size: int, progress: bool = True,
                     what: str = "images") -> Features | None:
    """Features of every image, in order. Under torchrun rank r takes the r-th of world-size
    contiguous blocks (one sequential read of its part of an npz) and rank 0 gets them all (the
    others get None)."""
    rank, world = _world()
    lo, hi = rank * images.count // world, (rank + 1) * images.count // world
    parts: list[Features] = []
    bar = tqdm(total=images.count, unit="img", desc=f"features of {what}", disable=not progress or rank != 0,
               file=sys.stderr, dynamic_ncols=True)
    with bar:
        for batch in images.batches(batch_size, lo, hi):
            parts.append(features(batch))
            bar.update(len(batch) * world)
    mine = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}
    if world == 1:
        return mine
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    return {key: np.concatenate([part[key] for part in gathered if part]) for key in next(p for p in gathered if p)}


def _cache_path(cache: str, images: ImageSet, weights_id: str) -> str:
    stat = os.stat(images.path)
    key = f"{os.path.abspath(images.path)}|{stat.st_size}|{stat.st_mtime_ns}|{images.count}|{weights_id}"
    return os.path.join(cache, hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")


def reference_features(images: ImageSet, features: FeatureFn, batch_size: int, cache: str | None,
                       weights_id: str, progress: bool) -> Features | None:
    """Features of the reference set, from the cache when it has them."""
    path = _cache_path(cache, images, weights_id) if cache else None
    if path and os.path.isfile(path):
        with np.load(path) as data:
            logger.info(f"reference features from the cache: {path}")
            return {k: data[k] for k in data.files} if _world()[0] == 0 else None
    result = compute_features(images, features, batch_size, progress, "the reference")
    if path and result is not None:
        os.makedirs(cache, exist_ok=True)
        np.savez(path + ".tmp.npz", **result)
        os.replace(path + ".tmp.npz", path)
    return result


def metrics(samples: Features, reference: Features | StatsOnly, *, device: str = "cpu",
            is_split: int = IS_SPLIT) -> dict[str, Any]:
    """FID, sFID, Inception Score, precision and recall; ``notes`` says what could not be computed."""
    notes: list[str] = []
    n = len(samples["pool"])
    if n < 2:
        raise EvalInputError(f"FID needs at least 2 samples, got {n}")
    if isinstance(reference, StatsOnly):
        ref_pool = GaussianStats(reference.arrays["mu"], reference.arrays["sigma"])
        ref_spatial = (GaussianStats(reference.arrays["mu_s"], reference.arrays["sigma_s"])
                       if "mu_s" in reference.arrays else None)
    else:
        ref_pool, ref_spatial = GaussianStats.of(reference["pool"]), GaussianStats.of(reference["spatial"])
    result: dict[str, Any] = {"num_samples": n, "fid": frechet_distance(GaussianStats.of(samples["pool"]), ref_pool)}
    if ref_spatial is not None:
        result["sfid"] = frechet_distance(GaussianStats.of(samples["spatial"]), ref_spatial)
    else:
        result["sfid"] = None
        notes.append("sFID needs mu_s and sigma_s in the reference statistics")
    if n >= is_split:
        result["inception_score"] = inception_score(samples["probabilities"], is_split)
    else:
        result["inception_score"] = None
        notes.append(f"the Inception Score is taken over splits of {is_split} samples; there are {n}")
    if isinstance(reference, StatsOnly):
        result["precision"] = result["recall"] = None
        notes.append("precision and recall need the reference's images (arr_0), not only its statistics")
    else:
        result["precision"], result["recall"] = precision_recall(reference["pool"], samples["pool"], device=device)
    result["notes"] = notes
    return result


def evaluate(samples_path: str, reference_path: str, *, weights: str | None = None, device: str = "cpu",
             batch_size: int = 100, cache: str | None = None, progress: bool = True) -> dict[str, Any] | None:
    """The metrics of ``samples_path`` against ``reference_path`` (see :mod:`.sources` for the forms);
    on rank 0 (None elsewhere under torchrun)."""
    started = time.perf_counter()
    samples, reference = open_input(samples_path), open_input(reference_path)
    if isinstance(samples, StatsOnly) and isinstance(reference, StatsOnly):
        # Two sets of statistics: FID (and sFID) need no network.
        a, b = samples.arrays, reference.arrays
        result = {"fid": frechet_distance(GaussianStats(a["mu"], a["sigma"]), GaussianStats(b["mu"], b["sigma"]))}
        if "mu_s" in a and "mu_s" in b:
            result["sfid"] = frechet_distance(GaussianStats(a["mu_s"], a["sigma_s"]), GaussianStats(b["mu_s"], b["sigma_s"]))
        return {**result, "samples": samples_path, "reference": reference_path}
    if isinstance(samples, StatsOnly):
        raise EvalInputError(f"{samples_path}: holds only statistics; the samples must be images (arr_0 or a folder) "
                             "for the Inception Score and precision/recall")
    from sfd_train.evaluation.inception import InceptionFeatures, find_weights

    weights = find_weights(weights)
    network = InceptionFeatures(weights, device)
    sample_features = compute_features(samples, network, batch_size, progress, "the samples")
    ref = reference if isinstance(reference, StatsOnly) else reference_features(
        reference, network, batch_size, cache if cache is not None else _default_cache(), os.path.basename(weights),
        progress)
    if _world()[0] != 0:
        return None
    result = metrics(sample_features, ref, device=device)
    result.update(samples=samples_path, reference=reference_path, seconds=round(time.perf_counter() - started, 1))
    return result
