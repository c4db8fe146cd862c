"""Configuration of the fused-kernel choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class KernelConfig:
    """Which implementation serves each op; 'auto' picks the fastest the installed stack has."""

    rms_norm: Literal["auto", "reference", "triton", "apex", "npu"] = "auto"
    """RMSNorm: pure PyTorch reference, Triton (CUDA), NVIDIA apex, or torch_npu.npu_rms_norm (Ascend)."""
    attention: Literal["auto", "reference", "sdpa", "npu"] = "auto"
    """Attention: reference, PyTorch SDPA (flash/cuDNN/efficient on CUDA), or torch_npu.npu_fusion_attention."""
