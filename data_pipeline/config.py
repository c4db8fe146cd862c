"""Configuration of the composite-latent data pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sfd_train.config.base import ConfigError


@dataclass
class DataConfig:
    """The composite-latent WebDataset shards (see the README's shard format)."""

    path: str = ""
    """Folder or fsspec URL (s3://...) holding manifest.json and the shards; 'synthetic' builds the built-in set."""
    num_workers: int = 2
    """Data-loader worker processes per rank."""
    use_flip: bool = True
    """Pick the stored horizontally flipped latents with probability 1/2."""
    use_repa_features: bool = True
    """Read the DINOv2 features (REPA targets) when the shards have them."""
    normalize: bool = True
    """Normalise texture and semantic parts with the manifest's per-channel statistics."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A corrupt sample stops the run ('error') or is skipped and counted ('skip')."""

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
