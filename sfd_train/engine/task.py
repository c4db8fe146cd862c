"""What the training loop trains: one :class:`TrainingTask` per kind of model.

The loop (:class:`~sfd_train.engine.trainer.Trainer`) owns what every run needs: the
data order, parallelism, mixed precision, gradient accumulation, EMA, checkpoints,
preemption, logging. A task owns what is particular to one model family: building it,
checking the data against it, the per-step random draws, the loss of a micro-batch,
and its own periodic outputs (sample grids, evaluations). Tasks:

* ``sfd`` -- the dual-timestep diffusion model (:mod:`sfd_train.diffusion.training`)
* ``semvae`` -- the Semantic VAE over DINOv2 features (:mod:`sfd_train.tokenizers.training`)

Which task a config belongs to follows from its type (see :func:`build_task`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from sfd_train.engine.trainer import Trainer


class TrainingTask:
    """The model-specific half of a training run.

    Args:
        config: the job config (its ``model`` section describes the network).
        loader: the run's data loader (its manifest says what the data hold).
    """

    find_unused_parameters = False
    """Whether DDP must look for parameters without a gradient (a head the loss does not use)."""

    def __init__(self, config: Any, loader: Any):
        self.config, self.loader = config, loader

    @classmethod
    def loader_options(cls, config: Any) -> dict[str, Any]:
        """Extra keyword arguments of the run's loader (e.g. samples kept out of training)."""
        return {}

    def check_data(self) -> None:
        """Raises ``ConfigError`` when the data do not fit the model."""

    def build_model(self, device: torch.device) -> nn.Module:
        """The network, on the CPU (built identically on every rank; parallelism comes after)."""
        raise NotImplementedError

    def step_draws(self, generator: torch.Generator, device: torch.device) -> Any:
        """The random inputs of one optimizer step, for the whole global batch (drawn once, so
        that they do not depend on the number of ranks or the micro-batch split)."""
        raise NotImplementedError

    def micro_batch_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], draws: Any,
                         rows: slice) -> dict[str, torch.Tensor]:
        """``{"loss": scalar to differentiate, <term>: batch mean, ...}`` of one micro-batch.

        Args:
            model: the wrapped model (call it, so that DDP and FSDP see the forward).
            batch: the micro-batch on the device.
            draws: from :meth:`step_draws`.
            rows: the micro-batch's rows within the global batch (to index ``draws``).
        """
        raise NotImplementedError

    def flops_per_image(self) -> float:
        """Training FLOPs per image (2 x multiply-adds, 3 x the forward), for the MFU."""
        raise NotImplementedError

    def after_step(self, trainer: "Trainer") -> None:
        """Periodic outputs after an optimizer step (every rank calls it: they may be collective)."""

    def finish(self, trainer: "Trainer") -> None:
        """Outputs at the end of training (every rank)."""


def task_class(config: Any) -> type[TrainingTask]:
    """The task a config belongs to: its type says (``task: semvae`` in a YAML file makes a SemVAE job)."""
    from sfd_train.config.semvae import SemVAEJobConfig

    if isinstance(config, SemVAEJobConfig):
        from sfd_train.tokenizers.training import SemVAETask

        return SemVAETask
    from sfd_train.diffusion.training import SFDTask

    return SFDTask
