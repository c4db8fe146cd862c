"""Training the dual-timestep diffusion model: the ``sfd`` task of the training loop.

Per optimizer step one global draw of noise, time and label dropout serves the whole
global batch, so the trajectory does not depend on the number of ranks or the
micro-batch split; each micro-batch takes its rows. Periodic outputs: grids of EMA
samples (``train.sample_every``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from sfd_train.config import Config, ConfigError
from sfd_train.diffusion.objective import LossInputs, combine_terms, draw_global_inputs, objective_terms
from sfd_train.diffusion.sampler import sample_with_config
from sfd_train.engine.compile import compile_step
from sfd_train.engine.task import TrainingTask
from sfd_train.engine.visualize import save_sample_grid
from sfd_train.kernels import build_kernel_ops
from sfd_train.models import build_model
from sfd_train.models.flops import training_flops_per_image

if TYPE_CHECKING:
    from sfd_train.engine.trainer import Trainer

logger = logging.getLogger("sfd_train")

LossFn = Callable[[nn.Module, torch.Tensor, LossInputs, "torch.Tensor | None"], dict[str, torch.Tensor]]


def build_loss_fn(config: Config) -> LossFn:
    """The function that computes one micro-batch's loss: ``fn(model, x, inputs, features)``.

    Returns ``{"loss": weighted total, "mse", "cos", "repa": batch means}`` (see
    :func:`sfd_train.diffusion.objective.combine_terms`); compiled as a whole with
    ``parallel.compile_scope: step`` (:func:`~sfd_train.engine.compile.compile_step`). The random
    inputs are drawn outside, so a compiled step replays exactly what the eager one computes.
    """
    model_config, objective = config.model, config.objective

    def training_loss(model: nn.Module, x: torch.Tensor, inputs: LossInputs, features: torch.Tensor | None):
        return combine_terms(objective_terms(model, x, inputs, features, model_config, objective), objective)

    return compile_step(training_loss, config.parallel)


class SFDTask(TrainingTask):
    """The SFD diffusion model on composite latents (REPA loss when the data have features)."""

    config_class = Config

    def __init__(self, config: Config, loader: Any):
        super().__init__(config, loader)
        model = config.model
        self.uses_repa = bool(model.use_repa and loader.feature_dim and config.objective.repa_weight > 0)
        # DDP must tolerate the projector's missing gradient when the REPA loss is off.
        self.find_unused_parameters = model.use_repa and not self.uses_repa
        self.loss_fn = build_loss_fn(config)
        self._evaluator = None

    def check_data(self) -> None:
        model, loader, path = self.config.model, self.loader, self.config.data.path
        texture, semantic = loader.channels
        if (texture + semantic, semantic) != (model.in_channels, model.semantic_channels):
            raise ConfigError(
                "model.in_channels",
                f"the data at {path!r} has {texture} texture + {semantic} semantic channels, "
                f"the model expects {model.texture_channels} + {model.semantic_channels} "
                "(set model.in_channels and model.semantic_channels)",
            )
        classes = loader.manifest.num_classes
        if classes > model.num_classes:
            raise ConfigError("model.num_classes", f"{model.num_classes}, but the data at {path!r} has {classes} "
                                                   f"classes (labels 0..{classes - 1}): set model.num_classes={classes}")
        size = loader.manifest.latent_size
        if tuple(size) != (model.input_size, model.input_size):
            raise ConfigError("model.input_size", f"the data's latents are {size[0]}x{size[1]}, the model expects "
                                                  f"{model.input_size}x{model.input_size}")
        features = loader.feature_dim
        if model.use_repa and features and features != model.repa_feature_dim:
            raise ConfigError("model.repa_feature_dim", f"the data's REPA features have {features} channels, "
                                                        f"the model projects to {model.repa_feature_dim}")

    @classmethod
    def build_model(cls, config: Config, device_type: str) -> nn.Module:
        return build_model(config.model, build_kernel_ops(config.kernels, device_type))

    def step_draws(self, generator: torch.Generator, device: torch.device) -> Any:
        config = self.config
        shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
        return draw_global_inputs(config.train.global_batch_size, shape, config.model, config.objective, generator,
                                  device)

    def micro_batch_loss(self, model, batch, draws, rows):
        noise, tau, drop = draws
        labels = torch.where(drop[rows], torch.full_like(batch["y"], self.config.model.num_classes), batch["y"])
        inputs = LossInputs(noise=noise[rows], tau=tau[rows], labels=labels)
        return self.loss_fn(model, batch["x"], inputs, batch.get("dino") if self.uses_repa else None)

    def flops_per_image(self) -> float:
        return training_flops_per_image(self.config.model, with_repa=self.uses_repa)

    def after_step(self, trainer: "Trainer") -> None:
        every = self.config.train.sample_every
        if every and trainer.step % every == 0:
            self.save_samples(trainer)
        every = self.config.eval.every
        if every and trainer.step % every == 0:
            self.evaluate(trainer)

    def finish(self, trainer: "Trainer") -> None:
        # The final weights' grid and evaluation, unless the loop just made them.
        every = self.config.train.sample_every
        if every and trainer.step % every:
            self.save_samples(trainer)
        every = self.config.eval.every
        if every and trainer.step % every:
            self.evaluate(trainer)
        if every and trainer.world.is_main:
            from sfd_train.engine.metrics import read_metrics
            from sfd_train.evaluation.during_training import summary

            lines = summary(read_metrics(trainer.run_dir))
            if lines:
                logger.info("evaluations of this run (plot: %s):\n%s", trainer.run_dir / "eval.png", "\n".join(lines))

    def evaluate(self, trainer: "Trainer") -> dict:
        """Scores of EMA samples and the validation loss (see :mod:`sfd_train.evaluation.during_training`)."""
        if self._evaluator is None:
            from sfd_train.evaluation.during_training import TrainingEvaluator

            self._evaluator = TrainingEvaluator(self.config, self.loader, trainer.device)
        return self._evaluator.run(trainer, self.uses_repa)

    # ------------------------------------------------------------------ sample grids
    def texture_decoder(self):
        """The synthetic dataset's decoder (pictures of the texture part), else None."""
        from sfd_train.data_pipeline import synthetic

        manifest = self.loader.manifest
        if not str(manifest.provenance.get("source", "")).startswith("synthetic"):
            return None
        return lambda texture: synthetic.decode_texture(texture, manifest)

    @torch.no_grad()
    def save_samples(self, trainer: "Trainer") -> Path | None:
        """A grid of EMA samples (two per class, guidance from ``sampler``); every rank takes part."""
        config, device = self.config, trainer.device
        classes = min(config.model.num_classes, 16)
        labels = torch.arange(classes, device=device).repeat(2)
        generator = torch.Generator(device=device).manual_seed(config.sampler.seed)
        shape = (len(labels), config.model.in_channels, config.model.input_size, config.model.input_size)
        noise = torch.randn(shape, generator=generator, device=device)
        ema = trainer.strategy.ema_for_sampling()
        with trainer.autocast:
            latents = sample_with_config(ema, noise, labels, config.model, config.sampler,
                                         num_steps=config.train.sample_steps)
        if not trainer.world.is_main:
            return None
        path = trainer.run_dir / "samples" / f"step_{trainer.step:09d}.png"
        save_sample_grid(latents.float(), config.model.texture_channels, path, columns=classes,
                         decoder=self.texture_decoder())
        trainer.metrics.log_image(trainer.step, path)
        logger.info(f"samples: {path}")
        return path

