"""Configuration of the composite-latent data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """The composite-latent WebDataset shards (see docs/data.md for the shard format)."""

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
    chunk_size: int | None = None
    """Consecutive stored samples kept together in the epoch order (bigger reads); null = 16 for shuffled datasets, 1 otherwise."""
    prefetch_factor: int = 2
    """Micro-batches each loader worker prepares ahead."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for URL paths (e.g. {anon: true}); credentials come from the environment, never from here."""
    direct_s3: bool = True
    """Read s3:// shards with presigned ranged GETs straight into the batch buffer (~3x less CPU); false = all reads through s3fs."""
    read_attempts: int = 8
    """Tries per storage read on transient errors (connection errors, 5xx, throttling), with exponential backoff."""
    synthetic_dir: str = ""
    """Where path=synthetic writes its dataset once; empty = $SFD_SYNTHETIC_DIR or ~/.cache/sfd_train/synthetic-v1."""

    def validate(self) -> None:
        # Imported here, not at the top: sfd_train.config's package imports this module
        # (schema.py), so a top-level import would be circular when the data pipeline
        # is imported first.
        from sfd_train.config.base import ConfigError  # noqa: PLC0415

        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError("chunk_size", f"must be >= 1 or null, got {self.chunk_size}")
        if self.prefetch_factor < 1:
            raise ConfigError("prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        if self.read_attempts < 1:
            raise ConfigError("read_attempts", f"must be >= 1, got {self.read_attempts}")
