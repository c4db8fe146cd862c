"""Models: the dual-timestep LightningDiT of SFD (no parallelism in here)."""

from __future__ import annotations

import contextlib

import torch

from sfd_train.config.schema import ModelConfig
from sfd_train.kernels import REFERENCE_OPS, KernelOps
from sfd_train.models.lightningdit import SFDLightningDiT
from sfd_train.models.sizes import MODEL_SIZES


def build_model(config: ModelConfig, ops: KernelOps = REFERENCE_OPS, device: str | torch.device | None = None) -> SFDLightningDiT:
    """Builds the model for ``config`` with the given kernels.

    Args:
        config: the model section.
        ops: kernel implementations (reference by default).
        device: where to create parameters; ``"meta"`` builds without memory (call
            ``to_empty`` and ``init_weights()`` before use).
    """
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return SFDLightningDiT(config, ops)


__all__ = ["MODEL_SIZES", "SFDLightningDiT", "build_model"]
