"""Attention through PyTorch's fused SDPA.

``F.scaled_dot_product_attention`` with its default scale ``1/sqrt(D_h)`` is the
reference's function. On CUDA, PyTorch picks among FlashAttention-2, cuDNN and
memory-efficient attention per call (head dims 64, 72 and 96 are all multiples of 8,
which each of them takes); under autocast it runs in bf16. On the CPU it uses the
flash-style CPU kernel (no N x N matrix), which is as fast as the reference there or
faster and agrees to fp32 rounding. A config may pin the backends (e.g. cuDNN only)
for measurements or to avoid a backend with a known problem.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# Config names -> torch.nn.attention.SDPBackend member names.
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, scale ``1/sqrt(D_h)``; ``(B, H, N, D_h)`` in and out."""
    return F.scaled_dot_product_attention(q, k, v)


def make_sdpa_attention(backends: Sequence[str] = ()) -> Callable[..., torch.Tensor]:
    """SDPA, restricted to ``backends`` (config names) when any are given.

    The restriction is a context manager around each call; ``torch.compile`` traces it.
    """
    if not backends:
        return sdpa_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unknown = [b for b in backends if b not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"unknown SDPA backends {unknown}; choose from {', '.join(SDPA_BACKENDS)}")
    chosen = [getattr(SDPBackend, SDPA_BACKENDS[b]) for b in backends]

    def pinned_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v)

    return pinned_sdpa_attention
