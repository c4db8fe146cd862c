"""Training the SemVAE on the engine: the ``semvae`` task of the training loop.

The features come from our shards (the ``dino`` field, the mirrored variant half the
time with ``data.use_flip``), streamed like any training data, so a run never holds the
whole feature set in memory and resumes exactly. The reparameterisation noise of a
step is drawn once for the global batch from the step's seed, as the SFD task draws
its noise. The last ``eval.holdout_shards`` shards are never trained on; every
``eval.every`` steps the model reconstructs the first ``eval.max_samples`` of them from
the posterior mean, and the feature MSE and the per-token cosine similarity are logged.

``sfd-train export RUN --out semvae.pt`` writes the weights in the authors' checkpoint
format (:func:`~sfd_train.tokenizers.semvae.export_semvae`), which ``sfd-data extract
--semvae`` and their own code load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.config.base import ConfigError
from sfd_train.config.semvae import SemVAEJobConfig
from sfd_train.engine.task import SavedWeights, TrainingTask
from sfd_train.tokenizers.semvae import SemVAE, export_semvae, semvae_loss

if TYPE_CHECKING:
    from sfd_train.engine.trainer import Trainer

logger = logging.getLogger("sfd_train")


def _tokens(features: torch.Tensor) -> torch.Tensor:
    """Channel-first features (B, D, g, g) as tokens (B, g * g, D), row-major."""
    return features.flatten(2).transpose(1, 2)


class SemVAETask(TrainingTask):
    """The Semantic VAE on DINOv2 features."""

    config_class = SemVAEJobConfig

    def __init__(self, config: SemVAEJobConfig, loader: Any):
        super().__init__(config, loader)
        self.objective = config.objective

    @classmethod
    def loader_options(cls, config: SemVAEJobConfig) -> dict[str, Any]:
        return {"holdout_shards": config.eval.holdout_shards}

    def check_data(self) -> None:
        width, path = self.loader.feature_dim, self.config.data.path
        if width is None:
            raise ConfigError("data.path", f"{path!r} holds no DINOv2 features (the dino field), or "
                                           "data.use_repa_features is false: the SemVAE trains on them")
        if width != self.config.model.input_dim:
            raise ConfigError("model.input_dim", f"{self.config.model.input_dim}, but the features at {path!r} have "
                                                 f"{width} channels")

    @property
    def grid(self) -> int:
        return self.loader.manifest.latent_size[0]

    @classmethod
    def build_model(cls, config: SemVAEJobConfig, device_type: str) -> nn.Module:
        return SemVAE(config.model)

    def step_draws(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        shape = (self.config.train.global_batch_size, self.config.model.bottleneck_dim, self.grid, self.grid)
        return torch.randn(shape, generator=generator, device=device)

    def micro_batch_loss(self, model, batch, draws, rows):
        o = self.objective
        return semvae_loss(model, _tokens(batch["dino"]), draws[rows], mse_weight=o.mse_weight, cos_weight=o.cos_weight,
                           l1_weight=o.l1_weight, kl_weight=o.kl_weight, cos_axis=o.cos_axis)

    def flops_per_image(self) -> float:
        # Every weight is used once per token (attention over 256 tokens adds ~4%): 2 FLOPs per
        # multiply-add, 3 x the forward for a training step.
        with torch.device("meta"):  # only the shapes are needed
            weights = sum(p.numel() for name, p in SemVAE(self.config.model).named_parameters() if p.dim() > 1)
        return 6.0 * weights * self.grid * self.grid

    @classmethod
    def export(cls, weights: SavedWeights, out: Path, format: str) -> Path:
        """The authors' SemVAE checkpoint format (``.pt`` or ``.safetensors``), which ``sfd-data extract
        --semvae`` and their own code load: the EMA weights, which equal the model's with the recipe's
        ``train.ema_decay: 0``; the iteration is the checkpoint's step."""
        from sfd_train.config.loader import build_config
        from sfd_train.engine.checkpoint import CheckpointManager
        from sfd_train.engine.weights import checkpoint_folder

        model = cls.build_model(build_config({"task": "semvae", "model": weights.config["model"]}), "cpu")
        model.load_state_dict(weights.ema if weights.ema is not None else weights.model, strict=True)
        step = CheckpointManager.read_train_state(checkpoint_folder(weights.source))["step"]
        return Path(export_semvae(model, out, iteration=int(step), format=format))

    def after_step(self, trainer: "Trainer") -> None:
        every = self.config.eval.every
        if every and trainer.step % every == 0 and self.config.eval.holdout_shards:
            self.evaluate(trainer)

    def finish(self, trainer: "Trainer") -> None:
        every = self.config.eval.every
        if every and trainer.step % every and self.config.eval.holdout_shards:
            self.evaluate(trainer)

    @torch.no_grad()
    def evaluate(self, trainer: "Trainer") -> dict[str, float]:
        """Reconstruction of held-out features from the posterior mean; every rank runs it (the
        model may be sharded), rank 0 logs ``eval_mse`` and ``eval_cos`` (mean per-token cosine)."""
        eval_config = self.config.eval
        first = self.loader.num_samples
        indices = np.arange(first, min(first + eval_config.max_samples, self.loader.manifest.num_samples))
        model = trainer.strategy.ema_for_sampling()
        squared, cosine, count = 0.0, 0.0, 0
        for lo in range(0, len(indices), eval_config.batch_size):
            features = self.loader.read_samples(indices[lo:lo + eval_config.batch_size])["dino"].to(trainer.device)
            tokens = _tokens(features)
            zeros = torch.zeros(len(tokens), self.config.model.bottleneck_dim, self.grid, self.grid, device=trainer.device)
            with trainer.autocast:
                _, _, recon = model(tokens, zeros)  # the latent is the posterior mean
            recon = recon.float()
            squared += F.mse_loss(recon, tokens, reduction="sum").item()
            cosine += F.cosine_similarity(recon, tokens, dim=-1).sum().item()
            count += tokens.shape[0] * tokens.shape[1]
        metrics = {"eval_mse": squared / (count * tokens.shape[-1]), "eval_cos": cosine / count}
        trainer.metrics.log(trainer.step, metrics, f"step {trainer.step} | held-out ({len(indices)} samples): "
                                                   f"feature MSE {metrics['eval_mse']:.5f}, per-token cosine "
                                                   f"{metrics['eval_cos']:.4f}")
        return metrics
