"""Configuration of the composite-latent data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sfd_train.data_pipeline.credentials import (
    credential_keys,
    how_to_give_credentials,
    url_has_password,
    without_password,
)

# How a profile is named in a config file, for the advice in error messages.
_PROFILE_OPTION = "storage_options: {profile: NAME}"


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
    """fsspec options for URL paths (e.g. {anon: true}); credentials come from the environment, ~/.aws or {profile: NAME}, never from here (refused)."""
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
        self._refuse_credentials()

    def _refuse_credentials(self) -> None:
        """Refuses secrets in ``path`` or ``storage_options``: this config is written in plain
        text to config.yaml, the checkpoints and W&B, so a secret here would leak."""
        from sfd_train.config.base import ConfigError  # noqa: PLC0415 - see validate()

        found = credential_keys(self.storage_options, "storage_options")
        if found:
            raise ConfigError(found[0], "looks like a credential; it would be saved in plain text with the config, "
                              f"checkpoints and W&B files. Remove it and {how_to_give_credentials(_PROFILE_OPTION)}")
        if url_has_password(self.path):
            raise ConfigError("path", f"{without_password(self.path)!r} embeds a password, which would be saved in "
                              "plain text with the config; remove 'user:password@' from the URL and "
                              f"{how_to_give_credentials(_PROFILE_OPTION)}")
