"""Per-channel statistics of the latents, and normalisation with them.

Statistics are taken over samples, H and W of the non-flipped latents (as the
published ``latents_stats.pt``), each part (texture, semantic) separately, with
the unbiased standard deviation. Partial results of shards merge exactly
(Chan et al.'s parallel variance), so they can be computed while writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from sfd_train.data_pipeline.errors import ManifestError


@dataclass
class ChannelStats:
    """Running count, mean and sum of squared deviations per channel (float64)."""

    channels: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.mean is None:
            self.mean = np.zeros(self.channels)
        if self.m2 is None:
            self.m2 = np.zeros(self.channels)

    def update(self, batch: np.ndarray | torch.Tensor) -> None:
        """Adds a batch of shape (B, C, H, W)."""
        x = torch.as_tensor(batch).to(torch.float64)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        if n == 0:
            return
        mean = x.mean(dim=(0, 2, 3))
        m2 = ((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        self.merge(ChannelStats(self.channels, n, mean.numpy(), m2.numpy()))

    def merge(self, other: "ChannelStats") -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count - 1, 1))

    def to_record(self) -> dict[str, list[float]]:
        """``{"mean", "std"}`` as float32-rounded lists, the form stored in manifests."""
        return {
            "mean": [float(v) for v in self.mean.astype(np.float32)],
            "std": [float(v) for v in self.std.astype(np.float32)],
        }

    def state(self) -> dict[str, Any]:
        return {"channels": self.channels, "count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "ChannelStats":
        return cls(int(state["channels"]), int(state["count"]), np.asarray(state["mean"]), np.asarray(state["m2"]))


def _stats_of(manifest_or_stats: Any, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(manifest_or_stats, "stats_tensors"):
        return manifest_or_stats.stats_tensors(part)
    if isinstance(manifest_or_stats, Mapping) and part in manifest_or_stats:
        s = manifest_or_stats[part]
        if isinstance(s, Mapping):
            s = (s["mean"], s["std"])
        mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in s)
        return mean, std
    raise ManifestError(f"no '{part}' statistics in {type(manifest_or_stats).__name__}")


def _composite_stats(manifest_or_stats: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    tex_mean, tex_std = _stats_of(manifest_or_stats, "texture")
    if channels == tex_mean.shape[0]:
        return tex_mean, tex_std
    sem_mean, sem_std = _stats_of(manifest_or_stats, "semantic")
    if channels == sem_mean.shape[0] + tex_mean.shape[0]:
        return torch.cat([tex_mean, sem_mean]), torch.cat([tex_std, sem_std])
    raise ValueError(
        f"{channels} channels is neither the texture part ({tex_mean.shape[0]}) "
        f"nor the composite latent ({tex_mean.shape[0] + sem_mean.shape[0]})"
    )


def normalize(x: torch.Tensor, manifest_or_stats: Any) -> torch.Tensor:
    """``(x - mean) / std`` per channel.

    Args:
        x: (B, C, H, W) composite latent (texture channels first) or its texture part alone.
        manifest_or_stats: a :class:`~sfd_train.data_pipeline.manifest.Manifest`, or
            ``{"texture": {"mean", "std"}, "semantic": {...}}``.
    """
    mean, std = _composite_stats(manifest_or_stats, x.shape[1])
    return (x - mean.to(x)) / std.to(x)


def denormalize(x: torch.Tensor, manifest_or_stats: Any) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std + mean`` per channel (composite or texture-only)."""
    mean, std = _composite_stats(manifest_or_stats, x.shape[1])
    return x * std.to(x) + mean.to(x)
