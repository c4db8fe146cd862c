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
    qk_norm_rope: Literal["auto", "separate", "triton"] = "auto"
    """The attention's input stage (q/k RMSNorm, RoPE, split into heads): 'separate' composes the rms_norm and rope choices; 'triton' is one fused kernel each way (CUDA), whose backward writes the qkv gradient in the Linear's layout, and which stays a kernel inside torch.compile. 'auto' is 'separate' until the fused kernel is measured faster in the compiled step."""
    swiglu: Literal["auto", "reference", "triton"] = "auto"
    """SwiGLU's input stage, the w12 Linear and the gate silu(x1) * x2: the reference expression (which Inductor fuses inside torch.compile), or the GEMM without its bias and one Triton kernel each way (CUDA) that adds the bias, returns the bias gradient from its backward, and stays a kernel inside torch.compile. 'auto' is the reference until the kernel is measured faster in the compiled step."""
    add_rms_norm: Literal["auto", "separate", "triton"] = "auto"
    """Inside each block, the attention's gated residual x + gate * attn with norm2 and the MLP's adaLN modulation: 'separate' adds, then calls the rms_norm choice; 'triton' is one kernel each way (CUDA) whose backward also returns the gate's, the shift's and the scale's per-sample sums, and which stays a kernel inside torch.compile. 'auto' is 'separate' until the fused kernel is measured faster in the compiled step."""
    inside_compile: Literal["inductor", "kernels"] = "inductor"
    """What the Triton/apex norm and RoPE ops (not qk_norm_rope, swiglu or add_rms_norm: their 'triton' is always the kernel) become inside torch.compile: 'inductor' hands Inductor the reference expression, which it fuses with the neighbouring residual add, gate and q/k RoPE (the faster compiled step); 'kernels' calls our kernels as opaque custom ops. Eager calls always use the kernels."""
    sdpa_backends: list[Literal["flash", "cudnn", "efficient", "math"]] = field(default_factory=list)
    """Restrict SDPA to these backends (PyTorch tries them in its own order); empty = let PyTorch choose."""
