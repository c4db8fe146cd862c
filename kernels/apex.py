"""NVIDIA apex's fused RMSNorm (used when installed; ``apex`` is imported only when chosen).

``apex.normalization.fused_layer_norm.fused_rms_norm_affine(input, weight,
normalized_shape, eps=1e-6, memory_efficient=False)``: fp32 statistics, output in the
input's dtype. apex's non-mixed kernel wants the weight in the input's dtype, so the
weight is cast (its gradient flows back through the cast).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import torch

from sfd_train.kernels.reference import modulate


def load_apex_norm() -> ModuleType:
    """Imports ``apex.normalization.fused_layer_norm``; raises ImportError when apex (or its CUDA extension) is absent."""
    module = importlib.import_module("apex.normalization.fused_layer_norm")
    if not hasattr(module, "fused_rms_norm_affine"):
        raise ImportError("apex is installed without fused_rms_norm_affine (apex older than 2022?)")
    return module


def make_apex_ops(apex_norm: ModuleType) -> tuple[Callable, Callable]:
    """``(rms_norm, rms_norm_modulate)`` calling apex's fused RMSNorm."""

    def apex_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
        shape = (x.shape[-1],)
        if weight is None:
            return apex_norm.fused_rms_norm(x, shape, eps)
        return apex_norm.fused_rms_norm_affine(x, weight.to(x.dtype), shape, eps)

    def apex_rms_norm_modulate(
        x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor, eps: float = 1e-6
    ) -> torch.Tensor:
        return modulate(apex_rms_norm(x, weight, eps), shift, scale)

    return apex_rms_norm, apex_rms_norm_modulate
