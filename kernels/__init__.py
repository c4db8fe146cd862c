"""Fused kernels behind one dispatch point (``sfd_train.kernels``, folder ``kernels/``)."""

from sfd_train.kernels.config import KernelConfig
from sfd_train.kernels.dispatch import REFERENCE_OPS, KernelOps, build_kernel_ops

__all__ = ["KernelConfig", "KernelOps", "REFERENCE_OPS", "build_kernel_ops"]
