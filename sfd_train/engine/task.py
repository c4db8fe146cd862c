"""What the training loop trains: the interface of a training task.

The loop (:class:`~sfd_train.engine.trainer.Trainer`) owns what every run needs: the
data order, parallelism, mixed precision, gradient accumulation, EMA, checkpoints,
preemption, logging. A task owns what is particular to one model family: its config class,
building the model, checking the data against it, the per-step random draws, the loss of a
micro-batch, exporting its weights and its own periodic outputs (sample grids, evaluations).

The engine is handed a task class and imports none: tasks live in their own packages and are
found by name in :mod:`sfd_train.config.registry` (torchtitan's ``TrainSpec`` registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from sfd_train.engine.trainer import Trainer


class SavedWeights(NamedTuple):
    """A checkpoint's weights as :func:`sfd_train.engine.weights.read_checkpoint_weights` reads them."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    config: dict[str, Any]
    """The job config saved with them (plain data)."""
    source: Path
    """Where they were read from (a file, or a checkpoint folder ``step_*``)."""


class TrainingTask:
    """The model-specific half of a training run.

    Args:
        config: the job config (an instance of :attr:`config_class`).
        loader: the run's data loader (its manifest says what the data hold).
    """

    config_class: type = object
    """The job config's dataclass (the registry entry names the same class)."""

    find_unused_parameters = False
    """Whether DDP must look for parameters without a gradient (a head the loss does not use)."""

    def __init__(self, config: Any, loader: Any):
        self.config, self.loader = config, loader

    @classmethod
    def loader_options(cls, config: Any) -> dict[str, Any]:
        """Extra keyword arguments of the run's loader (e.g. samples kept out of training)."""
        return {}

    @classmethod
    def build_model(cls, config: Any, device_type: str) -> nn.Module:
        """The network, initialised, on the current default device.

        The engine calls it under ``torch.device("meta")`` and materialises each rank's shard
        afterwards (:mod:`sfd_train.engine.materialize`), so everything the constructor does to a
        parameter must be a recordable in-place initialisation (``nn.init`` functions, ``fill_``,
        ``copy_`` from a CPU tensor).

        Args:
            config: the job config.
            device_type: where the model will run (``cpu``, ``cuda``, ``npu``), for kernel choices.
        """
        raise NotImplementedError

    def check_data(self) -> None:
        """Raises ``ConfigError`` when the data do not fit the model."""

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

    @classmethod
    def export(cls, weights: SavedWeights, out: Path, format: str) -> Path:
        """Writes ``weights`` as users of this model family read them; returns the file written.

        The default is the published SFD form: ``{"model", "ema", "config"}`` with ``torch.save``
        (``format="pt"``) or ``model.*`` / ``ema.*`` tensors (``format="safetensors"``).
        """
        from sfd_train.engine.weights import write_published

        return write_published(weights.model, weights.ema if weights.ema is not None else weights.model,
                               weights.config, out, format)
