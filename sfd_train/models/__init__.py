"""Models: the dual-timestep LightningDiT of SFD (no parallelism in here).

The model classes are imported on first use, so that reading a config (which
needs only :mod:`sfd_train.models.sizes`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sfd_train.models.sizes import MODEL_SIZES

if TYPE_CHECKING:
    from sfd_train.models.lightningdit import SFDLightningDiT


def build_model(config, ops=None, device=None) -> "SFDLightningDiT":
    """Builds the model for ``config`` with the given kernels.

    Args:
        config: the model section (:class:`sfd_train.config.ModelConfig`).
        ops: kernel implementations (:class:`sfd_train.kernels.KernelOps`; reference by default).
        device: where to create parameters; ``"meta"`` builds without memory (call
            ``to_empty`` and ``init_weights()`` before use).
    """
    import contextlib

    import torch

    from sfd_train.kernels import REFERENCE_OPS
    from sfd_train.models.lightningdit import SFDLightningDiT

    with torch.device(device) if device is not None else contextlib.nullcontext():
        return SFDLightningDiT(config, ops if ops is not None else REFERENCE_OPS)


def __getattr__(name: str):
    if name == "SFDLightningDiT":
        from sfd_train.models.lightningdit import SFDLightningDiT

        return SFDLightningDiT
    raise AttributeError(name)


__all__ = ["MODEL_SIZES", "SFDLightningDiT", "build_model"]
