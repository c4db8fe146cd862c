"""Configuration of the fused-kernel choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class KernelConfig:
    """Which implementation serves each op; 'auto' picks the fastest the installed stack has."""

    rms_norm: Literal["auto", "reference", "triton", "apex", "npu"] = "auto"
    """RMSNorm (and norm + adaLN modulation): pure PyTorch reference, Triton (CUDA), NVIDIA apex (CUDA), or torch_npu.npu_rms_norm (Ascend)."""
    attention: Literal["auto", "reference", "sdpa", "npu"] = "auto"
    """Attention: reference, PyTorch SDPA (flash/cuDNN/efficient on CUDA, flash-CPU on the CPU), or torch_npu.npu_fusion_attention."""
    rope: Literal["auto", "reference", "triton"] = "auto"
    """Rotary embedding on q/k: the reference expression, or one Triton kernel (CUDA)."""
    inside_compile: Literal["inductor", "kernels"] = "inductor"
    """What the Triton/apex norm and RoPE ops become inside torch.compile: 'inductor' hands Inductor the reference expression, which it fuses with the neighbouring residual add, gate and q/k RoPE (the faster compiled step); 'kernels' calls our kernels as opaque custom ops. Eager calls always use the kernels."""
    sdpa_backends: list[Literal["flash", "cudnn", "efficient", "math"]] = field(default_factory=list)
    """Restrict SDPA to these backends (PyTorch tries them in its own order); empty = let PyTorch choose."""
