"""Conversion of the published ``imagenet1k-latents`` layout into shards.

Accepted layout (one folder, files directly inside it):

* ``*.safetensors`` files, taken in sorted name order; each holds N samples as
  ``latents`` (N, C_tex, H, W), ``latents_flip``, ``latents_sv`` (N, C_sem, H, W),
  ``latents_sv_flip``, ``labels`` (N,) and optionally ``feats_dino`` /
  ``feats_dino_flip``, either (N, D, H, W) or token-major (N, H*W, D) with tokens
  row-major (transposed on conversion). Any float dtype.
* ``latents_stats.pt`` / ``latents_sv_stats.pt`` (optional): torch-saved dicts with
  ``mean`` and ``std`` of shape (1, C, 1, 1), (C, 1, 1) or (C,), recorded as the
  texture / semantic statistics unchanged. Without both files the statistics are
  computed while writing.

Source sample ``k`` is the k-th row counting through the files in that order.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
import torch

from sfd_train.data_pipeline.errors import DataError
from sfd_train.data_pipeline.format import (
    FEATURES,
    FEATURES_FLIP,
    SEMANTIC,
    SEMANTIC_FLIP,
    TEXTURE,
    TEXTURE_FLIP,
    to_stored_arrays,
)
from sfd_train.data_pipeline.manifest import Manifest
from sfd_train.data_pipeline.writer import write_dataset

# Published tensor name -> shard field.
PUBLISHED_KEYS = {
    "latents": TEXTURE,
    "latents_flip": TEXTURE_FLIP,
    "latents_sv": SEMANTIC,
    "latents_sv_flip": SEMANTIC_FLIP,
    "feats_dino": FEATURES,
    "feats_dino_flip": FEATURES_FLIP,
}
REQUIRED_KEYS = ("latents", "latents_flip", "latents_sv", "latents_sv_flip", "labels")
STATS_FILES = {"texture": "latents_stats.pt", "semantic": "latents_sv_stats.pt"}


def load_published_stats(path: str) -> dict[str, list[float]]:
    """Reads a ``*_stats.pt`` file into ``{"mean": [...], "std": [...]}`` (one value per channel)."""
    from sfd_train.safe_load import load_torch_file  # noqa: PLC0415

    data = load_torch_file(path)
    out = {}
    for key in ("mean", "std"):
        if key not in data:
            raise DataError(f"{path}: no '{key}' entry (keys: {list(data)})")
        t = torch.as_tensor(data[key]).float()
        if not (t.dim() == 1 or (t.dim() == 3 and t.shape[1:] == (1, 1)) or (t.dim() == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1))):
            raise DataError(f"{path}: '{key}' has shape {list(t.shape)}; expected (1, C, 1, 1), (C, 1, 1) or (C,)")
        out[key] = [float(v) for v in t.flatten()]
    return out


class PublishedSource:
    """The samples of a published-layout folder as a writer source.

    Args:
        folder: the folder of safetensors files.
        storage_dtype: ``"float16"``, ``"bfloat16"`` or ``"auto"`` (bfloat16 sources stay
            bfloat16, anything else becomes float16).
        with_features: convert ``feats_dino`` / ``feats_dino_flip`` if present.
        num_classes: number of classes; None = largest label + 1.
        dino_storage: None (features like the latents) or ``"int8"`` (compact, see :mod:`.compact`).
    """

    def __init__(self, folder: str, storage_dtype: str = "auto", with_features: bool = True, num_classes: int | None = None,
                 dino_storage: str | None = None):
        from safetensors import safe_open  # noqa: PLC0415 - optional at import time

        self.folder = os.path.abspath(folder)
        self.files = sorted(glob.glob(os.path.join(self.folder, "*.safetensors")))
        if not self.files:
            raise DataError(f"no *.safetensors files in {self.folder}")
        counts, keys, shapes, labels = [], None, None, []
        source_dtype = None
        for path in self.files:
            with safe_open(path, framework="pt", device="cpu") as f:
                file_keys = set(f.keys())
                missing = [k for k in REQUIRED_KEYS if k not in file_keys]
                if missing:
                    raise DataError(f"{path}: missing tensors {missing} (has {sorted(file_keys)})")
                present = tuple(k for k in PUBLISHED_KEYS if k in file_keys and (with_features or not k.startswith("feats")))
                if keys is None:
                    keys = present
                elif present != keys:
                    raise DataError(f"{path}: tensors {present} differ from the first file's {keys}")
                n = f.get_slice("labels").get_shape()[0]
                file_shapes = {k: tuple(f.get_slice(k).get_shape()[1:]) for k in keys}
                for k in keys:
                    if f.get_slice(k).get_shape()[0] != n:
                        raise DataError(f"{path}: '{k}' has {f.get_slice(k).get_shape()[0]} rows, 'labels' has {n}")
                if shapes is None:
                    shapes = file_shapes
                elif file_shapes != shapes:
                    raise DataError(f"{path}: shapes {file_shapes} differ from the first file's {shapes}")
                source_dtype = source_dtype or f.get_slice("latents").get_dtype()
                labels.append(f.get_tensor("labels").long())
                counts.append(n)
        assert keys is not None and shapes is not None
        self.keys = keys
        self.starts = np.cumsum([0] + counts)
        self.num_samples = int(self.starts[-1])
        all_labels = torch.cat(labels)
        if len(all_labels) and int(all_labels.min()) < 0:
            raise DataError(f"{self.folder}: negative labels")
        self.num_classes = int(num_classes) if num_classes else int(all_labels.max()) + 1
        if storage_dtype == "auto":
            storage_dtype = "bfloat16" if source_dtype in ("BF16", "bfloat16") else "float16"
        self.storage_dtype = storage_dtype
        self.dino_storage = dino_storage
        self.source_dtype = source_dtype
        spatial = shapes["latents"][1:]
        self._token_major = {}
        self.shapes = {}
        for k in keys:
            shape = shapes[k]
            if k.startswith("feats") and len(shape) == 2:
                if shape[0] != spatial[0] * spatial[1]:
                    raise DataError(f"'{k}' has {shape[0]} tokens; the latents have {spatial[0]}x{spatial[1]} positions")
                self._token_major[k] = True
                shape = (shape[1], *spatial)
            self.shapes[PUBLISHED_KEYS[k]] = tuple(shape)
        self._handles: dict[str, Any] = {}
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_handles={}, _pid=None)
        return state

    def describe(self) -> str:
        return f"published latents layout {self.folder} ({len(self.files)} safetensors files, {self.source_dtype})"

    def _open(self, path: str):
        from safetensors import safe_open  # noqa: PLC0415

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(path, framework="pt", device="cpu")
        return handle

    def read(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        file_of = np.searchsorted(self.starts, indices, side="right") - 1
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        labels = []
        for idx, fi in zip(indices, file_of):
            f = self._open(self.files[fi])
            r = int(idx - self.starts[fi])
            for k in self.keys:
                t = f.get_slice(k)[r : r + 1][0]
                if self._token_major.get(k):
                    h, w = self.shapes[TEXTURE][1:]
                    t = t.transpose(0, 1).reshape(-1, h, w)
                rows[k].append(t)
            labels.append(int(f.get_slice("labels")[r : r + 1][0]))
        arrays = to_stored_arrays({PUBLISHED_KEYS[k]: torch.stack(v) for k, v in rows.items()}, self.storage_dtype,
                                  self.dino_storage)
        return arrays, np.asarray(labels, dtype=np.int64)


def convert_published(
    src: str,
    out_dir: str,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 1,
    storage_dtype: str = "auto",
    with_features: bool = True,
    num_classes: int | None = None,
    dino_storage: str | None = None,
    command: str = "",
    progress: bool = True,
) -> Manifest:
    """Converts a published-layout folder into shards and a manifest (see the module doc).

    Resumable: re-running the same command skips shards that are complete. ``dino_storage="int8"``
    stores the features compact (see :mod:`.compact`).
    """
    source = PublishedSource(src, storage_dtype, with_features, num_classes, dino_storage)
    stats_paths = {part: os.path.join(source.folder, name) for part, name in STATS_FILES.items()}
    stats, stats_source = None, ""
    if all(os.path.exists(p) for p in stats_paths.values()):
        stats = {part: load_published_stats(p) for part, p in stats_paths.items()}
        for part, name in (("texture", TEXTURE), ("semantic", SEMANTIC)):
            if len(stats[part]["mean"]) != source.shapes[name][0]:
                raise DataError(f"{stats_paths[part]}: {len(stats[part]['mean'])} channels, the latents have {source.shapes[name][0]}")
        stats_source = "published " + " / ".join(STATS_FILES.values())
    return write_dataset(
        out_dir, source, shard_size=shard_size, seed=seed, shuffle=shuffle, workers=workers, stats=stats,
        stats_source=stats_source, command=command, progress=progress,
    )
