"""Fused kernels behind one dispatch point (``sfd_train.kernels``, folder ``kernels/``).

Nothing heavy is imported here: torch loads with the dispatch on first use, and
Triton, apex and torch_npu only when :func:`build_kernel_ops` chooses them.
"""

from sfd_train.kernels.config import KernelConfig

_LAZY = {
    "KernelOps": "sfd_train.kernels.dispatch",
    "REFERENCE_OPS": "sfd_train.kernels.dispatch",
    "build_kernel_ops": "sfd_train.kernels.dispatch",
    "detect_device_type": "sfd_train.device",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["KernelConfig", "KernelOps", "REFERENCE_OPS", "build_kernel_ops", "detect_device_type"]
