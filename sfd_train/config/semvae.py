"""The configuration of a SemVAE training job (``task: semvae`` at the top of a YAML file).

It shares the engine's sections (data, train, optimizer, parallel, checkpoint, run,
launcher) with an SFD job and replaces the model, objective and sampler with the
SemVAE's. Defaults are the published ``transformer_ch16`` recipe (DESIGN.md §8): batch
64, AdamW lr 5e-5, 500 warm-up steps from 0.01x, constant to step 800,500, then a cosine
down to 0.1x at 1M steps, bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sfd_train.config.base import ConfigError
from sfd_train.config.schema import CheckpointConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainConfig
from sfd_train.data_pipeline.config import DataConfig
from sfd_train.launchers.config import LauncherConfig
from sfd_train.tokenizers.config import SemVAEConfig


@dataclass
class SemVAEObjectiveConfig:
    """The SemVAE loss: weighted MSE, L1 and cosine of the reconstructed features, plus a KL term."""

    mse_weight: float = 1.0
    """Weight of the mean squared error of the reconstructed features."""
    l1_weight: float = 0.0
    """Weight of the mean absolute error (0 in the published recipe)."""
    cos_weight: float = 1.0
    """Weight of 1 - cosine similarity between reconstructed and input features."""
    kl_weight: float = 1e-7
    """Weight of the KL divergence (summed over the latent, averaged over the batch)."""
    cos_axis: Literal["tokens", "features"] = "tokens"
    """Axis of the cosine: 'tokens' reproduces the authors' loss (cosine across the tokens of each channel); 'features' takes it per token across channels."""

    def validate(self) -> None:
        for key in ("mse_weight", "l1_weight", "cos_weight", "kl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class SemVAEEvalConfig:
    """Reconstruction quality on held-out samples during training."""

    every: int = 2000
    """Evaluate every this many steps (0 = never)."""
    holdout_shards: int = 1
    """The dataset's last this many shards are never trained on; the evaluation reads them."""
    max_samples: int = 512
    """Held-out samples evaluated (the first of the held-out shards, not flipped)."""
    batch_size: int = 64
    """Samples per evaluation forward pass."""

    def validate(self) -> None:
        for key in ("every", "holdout_shards"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("max_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")


def _semvae_train() -> TrainConfig:
    return TrainConfig(max_steps=1_000_000, global_batch_size=64, ema_decay=0.0, log_every=100, sample_every=0)


def _semvae_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=5e-5, warmup_steps=500, warmup_start=0.01, schedule="cosine", decay_start=800_500,
                           min_lr_ratio=0.1)


@dataclass
class SemVAEJobConfig:
    """A SemVAE training job: DINOv2 features from composite-latent shards -> the semantic latent."""

    task: Literal["semvae"] = "semvae"
    """What is trained (a YAML file with `task: semvae` is read as this config)."""
    model: SemVAEConfig = field(default_factory=SemVAEConfig)
    """The SemVAE."""
    objective: SemVAEObjectiveConfig = field(default_factory=SemVAEObjectiveConfig)
    """The loss."""
    eval: SemVAEEvalConfig = field(default_factory=SemVAEEvalConfig)
    """Held-out reconstruction quality."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards with DINOv2 features (e.g. from sfd-data extract without --semvae); use_flip picks the mirrored features half the time."""
    train: TrainConfig = field(default_factory=_semvae_train)
    """The training loop (ema_decay 0: the published SemVAE keeps no EMA)."""
    optimizer: OptimizerConfig = field(default_factory=_semvae_optimizer)
    """AdamW and its schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism (activation checkpointing and compile are not used by this task)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resumption."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output folder, time limit, logging."""
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    """Cluster settings used by sfd-launch."""

    def validate(self) -> None:
        if self.parallel.activation_checkpointing or self.parallel.compile:
            raise ConfigError("parallel.compile", "the SemVAE task uses neither activation checkpointing nor compile")
        if self.parallel.strategy.startswith("zero"):
            raise ConfigError("parallel.strategy", f"{self.parallel.strategy!r}: the SemVAE trains with ddp or fsdp2")
