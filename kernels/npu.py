"""Ascend kernels from ``torch_npu`` (imported only when these ops are built).

- RMSNorm: ``torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``; gamma must
  have x's dtype, so the (fp32) weight is cast (its gradient flows back through the cast).
- Attention: ``torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout,
  pse=None, padding_mask=None, atten_mask=None, scale=1., keep_prob=1., pre_tockens,
  next_tockens, inner_precise, prefix, ..., sparse_mode) -> (attention_out, ...)``. Its
  default scale is 1, not 1/sqrt(D), so the scale is always passed; the layout is BNSD,
  which is the model's (B, H, N, D_h); no mask, no dropout (keep_prob 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from types import ModuleType
from typing import Callable

import torch

from sfd_train.kernels.reference import modulate

# "No limit" for the sparse window: every query sees every key.
_FULL_WINDOW = 2147483647


def load_torch_npu() -> ModuleType:
    """Imports torch_npu (which also registers ``torch.npu``)."""
    return importlib.import_module("torch_npu")


def make_npu_ops(torch_npu: ModuleType) -> tuple[Callable, Callable, Callable]:
    """``(rms_norm, rms_norm_modulate, attention)`` calling ``torch_npu``'s fused kernels."""

    def npu_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
        gamma = weight.to(x.dtype) if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch_npu.npu_rms_norm(x.contiguous(), gamma, epsilon=eps)[0]

    def npu_rms_norm_modulate(
        x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor, eps: float = 1e-6
    ) -> torch.Tensor:
        return modulate(npu_rms_norm(x, weight, eps), shift, scale)

    def npu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The kernel wants one dtype for q, k, v; under autocast that is the autocast dtype.
        device_type = q.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
        q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
        return torch_npu.npu_fusion_attention(
            q, k, v, q.shape[1], "BNSD",
            pse=None,
            padding_mask=None,
            atten_mask=None,
            scale=1.0 / math.sqrt(q.shape[-1]),
            keep_prob=1.0,
            pre_tockens=_FULL_WINDOW,
            next_tockens=_FULL_WINDOW,
            inner_precise=0,
            sparse_mode=0,
        )[0]

    return npu_rms_norm, npu_rms_norm_modulate, npu_attention
