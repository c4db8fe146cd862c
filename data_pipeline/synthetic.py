"""The built-in synthetic dataset: coloured shapes turned into composite latents.

Small enough to train on two CPU cores in minutes, and a person can look at what
was learned. Each 32x32 RGB picture shows one shape (disk, square, triangle, ring,
cross) in a warm or a cool colour on a dark, shaded background: 5 x 2 = 10 classes
(``class = 2 * shape + palette``), with random position, size and tint.

The "encoders" are fixed and simple:

* **texture** (12 x 8 x 8): 2x2 average pooling to 16x16, then an orthonormal 2x2
  Haar transform per colour channel (per 8x8 cell: LL, LH, HL, HH of R, G, B).
  :func:`decode_texture` inverts it exactly on the 16x16 picture and upsamples.
* **semantic** (4 x 8 x 8): from the shape's mask and class only, what the picture
  shows and where: ``2 * coverage - 1`` of each cell, coverage times the shape's
  direction on a circle (2 channels), coverage times the palette sign. It carries
  the layout the texture must follow, as the SemVAE latent does for real images.
* **REPA-like features** (32 x 8 x 8): ``tanh`` of a fixed random projection of the
  texture and semantic latents and their 3x3 neighbourhood average.

Flipped variants are encodings of the mirrored picture.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

import numpy as np
import torch

from sfd_train.data_pipeline.format import (
    FEATURES,
    FEATURES_FLIP,
    SEMANTIC,
    SEMANTIC_FLIP,
    TEXTURE,
    TEXTURE_FLIP,
    to_stored_arrays,
)
from sfd_train.data_pipeline.manifest import Manifest, read_manifest
from sfd_train.data_pipeline.stats import denormalize
from sfd_train.data_pipeline.writer import is_complete, write_dataset

IMAGE_SIZE = 32
GRID = 8
TEXTURE_CHANNELS = 12
SEMANTIC_CHANNELS = 4
FEATURE_DIM = 32
SHAPES = ("disk", "square", "triangle", "ring", "cross")
PALETTES = ("warm", "cool")
CLASS_NAMES = tuple(f"{palette} {shape}" for shape in SHAPES for palette in PALETTES)
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_NUM_SAMPLES = 4096
DEFAULT_SHARD_SIZE = 1024
VERSION = 1
# The fixed "feature encoder" does not depend on the dataset seed.
_FEATURE_SEED = 20251204


def _params(indices: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per-sample drawing parameters; sample ``i`` depends only on (seed, i)."""
    rows = []
    for i in indices:
        rng = np.random.Generator(np.random.PCG64([int(seed), int(i), VERSION]))
        rows.append(rng.random(12))
    u = np.array(rows).reshape(len(indices), 12)
    labels = np.asarray(indices, dtype=np.int64) % NUM_CLASSES  # balanced classes
    return {
        "label": labels,
        "shape": labels // 2,
        "palette": labels % 2,
        "cx": 10 + 12 * u[:, 0],
        "cy": 10 + 12 * u[:, 1],
        "radius": 6 + 4 * u[:, 2],
        "tint": u[:, 3:6],
        "bg": 0.08 + 0.2 * u[:, 6],
        "bg_angle": 2 * np.pi * u[:, 7],
        "bg_amp": 0.12 * u[:, 8],
        "noise_seed": (u[:, 9] * 2**31).astype(np.int64),
    }


def _signed_distance(p: dict[str, np.ndarray]) -> np.ndarray:
    """Signed distance in pixels to each sample's shape outline, (B, 32, 32)."""
    coords = np.arange(IMAGE_SIZE) + 0.5
    dx, dy = np.broadcast_arrays(coords[None, None, :] - p["cx"][:, None, None], coords[None, :, None] - p["cy"][:, None, None])
    r = p["radius"][:, None, None]
    dist = np.sqrt(dx**2 + dy**2)
    disk = dist - r
    square = np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    triangle = np.maximum.reduce([dy, -0.866 * dx - 0.5 * dy, 0.866 * dx - 0.5 * dy]) - 0.5 * r
    ring = np.abs(dist - 0.72 * r) - 0.28 * r
    cross = np.minimum(
        np.maximum(np.abs(dx) - r, np.abs(dy) - 0.3 * r), np.maximum(np.abs(dx) - 0.3 * r, np.abs(dy) - r)
    )
    all_shapes = np.stack([disk, square, triangle, ring, cross])
    return all_shapes[p["shape"], np.arange(len(p["shape"]))]


def render(indices: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws the pictures of samples ``indices``.

    Returns:
        ``(images (B, 3, 32, 32) float32 in [0, 1], masks (B, 32, 32) in [0, 1], labels (B,))``.
    """
    p = _params(np.asarray(indices), seed)
    mask = np.clip(0.5 - _signed_distance(p), 0.0, 1.0)  # one pixel of anti-aliasing
    warm = np.stack([0.85 + 0.15 * p["tint"][:, 0], 0.15 + 0.45 * p["tint"][:, 1], 0.05 + 0.15 * p["tint"][:, 2]], 1)
    cool = np.stack([0.05 + 0.15 * p["tint"][:, 0], 0.3 + 0.45 * p["tint"][:, 1], 0.8 + 0.2 * p["tint"][:, 2]], 1)
    colour = np.where(p["palette"][:, None] == 0, warm, cool)
    coords = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE - 0.5
    ramp = np.cos(p["bg_angle"])[:, None, None] * coords[None, None, :] + np.sin(p["bg_angle"])[:, None, None] * coords[None, :, None]
    bg = p["bg"][:, None, None] + p["bg_amp"][:, None, None] * ramp
    noise = np.stack([np.random.Generator(np.random.PCG64(int(s))).normal(0, 0.02, (3, IMAGE_SIZE, IMAGE_SIZE)) for s in p["noise_seed"]])
    images = bg[:, None] * (1 - mask[:, None]) + colour[:, :, None, None] * mask[:, None] + noise
    return np.clip(images, 0, 1).astype(np.float32), mask.astype(np.float32), p["label"]


def encode_texture(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) pictures in [0, 1] -> (B, 12, 8, 8) texture latents."""
    b = images.shape[0]
    x = images.float().reshape(b, 3, 16, 2, 16, 2).mean(dim=(3, 5)) - 0.5
    a, bb, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    bands = torch.stack([(a + bb + c + d) / 2, (a - bb + c - d) / 2, (a + bb - c - d) / 2, (a - bb - c + d) / 2], dim=2)
    return bands.reshape(b, TEXTURE_CHANNELS, GRID, GRID)


def decode_texture(tex_latent: torch.Tensor, manifest_or_stats: Any = None) -> torch.Tensor:
    """Texture latents back to pictures (the inverse of :func:`encode_texture`).

    Args:
        tex_latent: (B, 12, 8, 8) texture latents, or (B, 16, 8, 8) composite latents
            (the texture part is used).
        manifest_or_stats: if given, the latents are normalised ones and are first
            de-normalised with its texture statistics (a Manifest, or
            ``{"texture": {"mean", "std"}, ...}``).

    Returns:
        (B, 3, 32, 32) float32 pictures clamped to [0, 1].
    """
    x = tex_latent.detach().float().cpu()
    if manifest_or_stats is not None:
        x = denormalize(x, manifest_or_stats)
    x = x[:, :TEXTURE_CHANNELS]
    b = x.shape[0]
    ll, lh, hl, hh = x.reshape(b, 3, 4, GRID, GRID).unbind(dim=2)
    out = torch.empty(b, 3, 16, 16)
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
    out[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    out = out + 0.5
    return out.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).clamp(0, 1)


def encode_semantic(masks: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, 32, 32) shape masks and class labels -> (B, 4, 8, 8) semantic latents."""
    b = masks.shape[0]
    cover = masks.float().reshape(b, GRID, 4, GRID, 4).mean(dim=(2, 4))
    shape = (labels // 2).float()
    angle = 2 * torch.pi * shape / len(SHAPES)
    sign = 1.0 - 2.0 * (labels % 2).float()
    per_class = torch.stack([torch.cos(angle), torch.sin(angle), sign], dim=1)  # (B, 3)
    return torch.cat([2 * cover[:, None] - 1, cover[:, None] * per_class[:, :, None, None]], dim=1)


def _feature_weights() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.Generator(np.random.PCG64(_FEATURE_SEED))
    inputs = 2 * (TEXTURE_CHANNELS + SEMANTIC_CHANNELS)
    w = rng.normal(0, 1.5 / np.sqrt(inputs), (FEATURE_DIM, inputs))
    bias = rng.normal(0, 0.1, FEATURE_DIM)
    return torch.tensor(w, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)


def encode_features(tex: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
    """REPA-like features (B, 32, 8, 8) from the two latents."""
    x = torch.cat([tex, sem], dim=1)
    context = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    w, bias = _feature_weights()
    return torch.tanh(torch.einsum("oc,bchw->bohw", w, torch.cat([x, context], dim=1)) + bias.view(1, -1, 1, 1))


class SyntheticSource:
    """The synthetic samples as a writer source (see :class:`~.writer.SampleSource`)."""

    def __init__(self, num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0, with_features: bool = True,
                 storage_dtype: str = "float16", dino_storage: str | None = None):
        self.num_samples = int(num_samples)
        self.num_classes = NUM_CLASSES
        self.seed = int(seed)
        self.storage_dtype = storage_dtype
        self.dino_storage = dino_storage
        self.with_features = with_features
        latent = (GRID, GRID)
        self.shapes = {
            TEXTURE: (TEXTURE_CHANNELS, *latent),
            TEXTURE_FLIP: (TEXTURE_CHANNELS, *latent),
            SEMANTIC: (SEMANTIC_CHANNELS, *latent),
            SEMANTIC_FLIP: (SEMANTIC_CHANNELS, *latent),
        }
        if with_features:
            self.shapes.update({FEATURES: (FEATURE_DIM, *latent), FEATURES_FLIP: (FEATURE_DIM, *latent)})

    def describe(self) -> str:
        return f"synthetic coloured shapes v{VERSION} (seed {self.seed}, {self.num_samples} samples)"

    def read(self, indices: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        images, masks, labels = render(indices, self.seed)
        images, masks, y = torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels)
        out = {}
        for suffix, img, mask in (("", images, masks), ("_flip", images.flip(-1), masks.flip(-1))):
            tex = encode_texture(img)
            sem = encode_semantic(mask, y)
            out[f"tex{suffix}.npy"] = tex
            out[f"sem{suffix}.npy"] = sem
            if self.with_features:
                out[f"dino{suffix}.npy"] = encode_features(tex, sem)
        return to_stored_arrays(out, self.storage_dtype, self.dino_storage), labels


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    *,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    with_features: bool = True,
    storage_dtype: str = "float16",
    dino_storage: str | None = None,
    workers: int = 1,
    progress: bool = False,
    command: str = "",
) -> Manifest:
    """Writes the synthetic dataset (shards and manifest) into ``out_dir``.

    The default 4096 samples (10 classes, ~80 MB) take a few seconds on one core.
    ``dino_storage="int8"`` stores the features compact (see :mod:`.compact`).
    """
    source = SyntheticSource(num_samples, seed, with_features, storage_dtype, dino_storage)
    return write_dataset(
        out_dir, source, shard_size=shard_size, seed=seed, workers=workers, progress=progress,
        command=command or f"write_synthetic_dataset({os.fspath(out_dir)!r}, {num_samples})",
    )


def default_synthetic_dir() -> str:
    """Where ``data.path=synthetic`` keeps its dataset: ``$SFD_SYNTHETIC_DIR``, else
    ``$XDG_CACHE_HOME/sfd_train/synthetic-v1`` (``~/.cache/...``)."""
    if os.environ.get("SFD_SYNTHETIC_DIR"):
        return os.environ["SFD_SYNTHETIC_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sfd_train", f"synthetic-v{VERSION}")


VALIDATION = "validation"
"""Sub-folder of the synthetic dataset holding its validation set (other pictures: another seed)."""


def ensure_synthetic_validation_set(dir: str | os.PathLike | None = None) -> str:  # noqa: A002
    """The synthetic set's validation set (512 samples of seed 1) inside its folder, written once."""
    return ensure_synthetic_dataset(os.path.join(ensure_synthetic_dataset(dir), VALIDATION), num_samples=512, seed=1)


def ensure_synthetic_dataset(dir: str | os.PathLike | None = None, num_samples: int = DEFAULT_NUM_SAMPLES,  # noqa: A002
                             seed: int = 0) -> str:
    """Writes the default synthetic dataset into ``dir`` once and returns its path.

    Idempotent and safe when several ranks call it at once: a file lock makes
    one of them write while the others wait, then all find it complete.

    Args:
        dir: folder for the dataset; None = :func:`default_synthetic_dir`.
    """
    path = os.path.abspath(os.fspath(dir) if dir is not None else default_synthetic_dir())
    if is_complete(path):
        read_manifest(path)
        return path
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not is_complete(path):
                write_synthetic_dataset(path, num_samples, seed=seed, command="ensure_synthetic_dataset")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
