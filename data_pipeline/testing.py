"""Helpers for tests (ours and the trainer's): small datasets and fake published folders."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from sfd_train.data_pipeline.manifest import Manifest, read_manifest
from sfd_train.data_pipeline.synthetic import write_synthetic_dataset


def tiny_synthetic(out_dir: str, num_samples: int = 300, shard_size: int = 64, with_features: bool = True, seed: int = 0) -> Manifest:
    """A small synthetic dataset (several shards, the last one partial)."""
    return write_synthetic_dataset(out_dir, num_samples, seed=seed, shard_size=shard_size, with_features=with_features)


def make_published_folder(
    folder: str,
    counts: Sequence[int] = (40, 37, 50),
    *,
    tex_channels: int = 8,
    sem_channels: int = 4,
    feature_dim: int | None = 6,
    flipped_features: bool = True,
    size: int = 4,
    num_classes: int = 7,
    dtype: torch.dtype = torch.float16,
    token_major_features: bool = False,
    stats_shape: str = "1C11",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Writes a folder in the published ``imagenet1k-latents`` layout.

    One safetensors file per entry of ``counts`` (``latents_rank00_shard000.safetensors``, ...)
    with ``latents``, ``latents_flip``, ``latents_sv``, ``latents_sv_flip``, ``labels`` and
    optionally ``feats_dino`` / ``feats_dino_flip``; plus ``latents_stats.pt`` and
    ``latents_sv_stats.pt`` with ``mean``/``std`` of shape (1, C, 1, 1) (``stats_shape="1C11"``),
    (C, 1, 1) (``"C11"``) or (C,) (``"C"``).

    Returns:
        All tensors concatenated over the files (source order), and the stats, for comparison.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    everything: dict[str, list[torch.Tensor]] = {}
    for i, n in enumerate(counts):
        tensors = {
            "latents": torch.randn(n, tex_channels, size, size, generator=g) * 2 + 0.5,
            "latents_flip": torch.randn(n, tex_channels, size, size, generator=g) * 2 + 0.5,
            "latents_sv": torch.randn(n, sem_channels, size, size, generator=g) - 1,
            "latents_sv_flip": torch.randn(n, sem_channels, size, size, generator=g) - 1,
            "labels": torch.randint(0, num_classes, (n,), generator=g),
        }
        if feature_dim:
            tensors["feats_dino"] = torch.randn(n, feature_dim, size, size, generator=g)
            if flipped_features:
                tensors["feats_dino_flip"] = torch.randn(n, feature_dim, size, size, generator=g)
        for k in list(tensors):
            if k != "labels":
                tensors[k] = tensors[k].to(dtype)
            everything.setdefault(k, []).append(tensors[k])
        stored = dict(tensors)
        if token_major_features:
            for k in ("feats_dino", "feats_dino_flip"):
                if k in stored:
                    stored[k] = stored[k].flatten(2).transpose(1, 2).contiguous()  # (N, H*W, D), tokens row-major
        save_file(stored, os.path.join(folder, f"latents_rank00_shard{i:03d}.safetensors"), metadata={"total_size": str(n)})
    out = {k: torch.cat(v) for k, v in everything.items()}
    for key, name in (("latents", "latents_stats.pt"), ("latents_sv", "latents_sv_stats.pt")):
        x = out[key].float()
        mean, std = x.mean(dim=(0, 2, 3), keepdim=True), x.std(dim=(0, 2, 3), keepdim=True)
        if stats_shape == "C11":
            mean, std = mean[0], std[0]
        elif stats_shape == "C":
            mean, std = mean.flatten(), std.flatten()
        torch.save({"mean": mean, "std": std}, os.path.join(folder, name))
        out[f"{key}_mean"], out[f"{key}_std"] = mean.flatten(), std.flatten()
    return out


def dinov2_like_features(batch: int, *, dim: int = 768, size: int = 16, outlier_channels: int = 8,
                         high_norm_tokens: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Synthetic stand-ins for DINOv2-B patch features (B, dim, size, size), with their awkward parts.

    DINOv2 returns the tokens after its final LayerNorm, so each token is normalised over its
    channels and then scaled and shifted per channel by the norm's weight and bias. Modelled here:
    spatially smooth content of low rank (48 factors on a 4x4 grid, upsampled, plus noise), the
    per-token normalisation, per-channel weights spread log-normally with ``outlier_channels``
    channels 8-30 times larger (and shifted by half that), which is what makes a per-token scale
    alone fail, and a fraction ``high_norm_tokens`` of tokens 8 times larger than the rest (the
    high-norm "artifact" tokens registers were introduced against; rare with registers), which is
    what makes a per-channel scale alone fail.

    Returns:
        float32 features, deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    rank = 48
    coarse = torch.randn(batch, rank, max(size // 4, 1), max(size // 4, 1), generator=g)
    factors = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    factors = factors + 0.3 * torch.randn(batch, rank, size, size, generator=g)
    mixing = torch.randn(dim, rank, generator=g) / rank**0.5
    x = torch.einsum("dr,brhw->bdhw", mixing, factors) + 0.5 * torch.randn(batch, dim, size, size, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    weight = torch.exp(0.35 * torch.randn(dim, generator=g))
    bias = 0.3 * torch.randn(dim, generator=g)
    outliers = torch.randperm(dim, generator=g)[:outlier_channels]
    gains = 8 + 22 * torch.rand(outlier_channels, generator=g)
    weight[outliers] *= gains
    bias[outliers] += 0.5 * gains * torch.sign(torch.randn(outlier_channels, generator=g))
    x = x * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    high = torch.rand(batch, 1, size, size, generator=g) < high_norm_tokens
    return torch.where(high, 8 * x, x)


def shard_path(dataset: str, manifest: Manifest | None = None, shard: int = 0) -> str:
    manifest = manifest or read_manifest(dataset)
    return os.path.join(dataset, manifest.shards[shard].name)


def patch_bytes(path: str, offset: int, data: bytes) -> None:
    """Overwrites bytes of a file in place (to corrupt a shard on purpose)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def sample_offset(manifest: Manifest, index: int, member: str) -> tuple[str, int]:
    """``(shard name, byte offset of member's tar header)`` of sample ``index``."""
    for s in manifest.shards:
        if s.first_index <= index < s.first_index + s.count:
            return s.name, (index - s.first_index) * manifest.layout.stride + manifest.layout.members[member].offset
    raise IndexError(index)


def collect(loader, steps: int) -> list[dict[str, torch.Tensor]]:
    """The next ``steps`` batches of ``loader``."""
    return [next(loader) for _ in range(steps)]


def indices_of(batches) -> np.ndarray:
    return np.concatenate([b["index"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)
