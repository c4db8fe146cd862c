"""SwiGLU's gate in one kernel each way (Triton): ``silu(x1) * x2`` with ``x1, x2 = x12.chunk(2, -1)``.

The forward reads the ``w12`` Linear's output once and writes the ``w3`` Linear's input; the
backward reads that output and the incoming gradient once and writes the gradient of the whole
``x12`` in place of the split, the two products and the concatenation (10 bytes per hidden
unit and token in bf16). Inside the compiled XL step Inductor's SwiGLU backward ran at about
1.4x those bytes (118 us against 83, benchmarks/NOTES.md); both neighbours are GEMMs, so an
opaque kernel here costs no fusion.

Numerics: fp32 arithmetic, one rounding to x12's dtype. The reference (``F.silu(x1) * x2``)
rounds the silu once more in bf16/fp16; the two agree within the dtype's rounding.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from sfd_train.kernels.triton_rms_norm import _direct, register_op, vector_alignment

# Values per program, warps: 8 values a thread, so 16-byte accesses in bf16.
BLOCK, NUM_WARPS = 1024, 4


@triton.jit
def _load_halves(X12, hidden, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """This program's ``x1, x2`` (fp32) and where they lie: program (row, block of hidden units), no division."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    x_row = tl.multiple_of(row * 2 * hidden, ALIGN)
    x1 = tl.load(X12 + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + x_row + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    return x1, x2, x_row, tl.multiple_of(row * hidden, ALIGN), cols, mask


@triton.jit
def _swiglu_fwd_kernel(X12, H, hidden, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    x1, x2, _, h_row, cols, mask = _load_halves(X12, hidden, BLOCK, ALIGN)
    h = x1 * tl.sigmoid(x1) * x2
    tl.store(H + h_row + cols, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, X12, DX12, hidden, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    x1, x2, x_row, h_row, cols, mask = _load_halves(X12, hidden, BLOCK, ALIGN)
    dh = tl.load(DH + h_row + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.sigmoid(x1)
    silu = x1 * gate
    # d silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
    dx1 = dh * x2 * gate * (1.0 + x1 * (1.0 - gate))
    tl.store(DX12 + x_row + cols, dx1.to(DX12.dtype.element_ty), mask=mask)
    tl.store(DX12 + x_row + hidden + cols, (dh * silu).to(DX12.dtype.element_ty), mask=mask)


def _rows_and_hidden(x12: torch.Tensor) -> Tuple[int, int]:
    two_hidden = int(x12.shape[-1])
    return x12.numel() // two_hidden if two_hidden else 0, two_hidden // 2


def _fwd(x12: torch.Tensor, launch=_direct) -> torch.Tensor:
    x12 = x12.contiguous()
    rows, hidden = _rows_and_hidden(x12)
    h = torch.empty((*x12.shape[:-1], hidden), dtype=x12.dtype, device=x12.device)
    launch(_swiglu_fwd_kernel)[(rows, triton.cdiv(hidden, BLOCK))](
        x12, h, hidden, BLOCK=BLOCK, ALIGN=vector_alignment(hidden, x12.element_size()), num_warps=NUM_WARPS)
    return h


def _bwd(dh: torch.Tensor, x12: torch.Tensor, launch=_direct) -> torch.Tensor:
    dh, x12 = dh.contiguous(), x12.contiguous()
    rows, hidden = _rows_and_hidden(x12)
    dx12 = torch.empty(x12.shape, dtype=x12.dtype, device=x12.device)
    launch(_swiglu_bwd_kernel)[(rows, triton.cdiv(hidden, BLOCK))](
        dh, x12, dx12, hidden, BLOCK=BLOCK, ALIGN=vector_alignment(hidden, min(dh.element_size(), x12.element_size())),
        num_warps=NUM_WARPS)
    return dx12


# --------------------------------------------------------------------------- custom ops (torch.compile)


def _fwd_fake(x12):
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@register_op("sfd_kernels::swiglu_fwd", _fwd_fake)
def swiglu_fwd_op(x12: torch.Tensor, launch=_direct) -> torch.Tensor:
    """Forward: ``silu(x1) * x2``."""
    return _fwd(x12, launch)


def _bwd_fake(dh, x12):
    return x12.new_empty(x12.shape)


@register_op("sfd_kernels::swiglu_bwd", _bwd_fake)
def swiglu_bwd_op(dh: torch.Tensor, x12: torch.Tensor, launch=_direct) -> torch.Tensor:
    """Backward: the gradient of x12."""
    return _bwd(dh, x12, launch)


def _setup_context(ctx, inputs, output):
    (x12,) = inputs
    ctx.save_for_backward(x12)


def _backward(ctx, dh):
    (x12,) = ctx.saved_tensors
    return torch.ops.sfd_kernels.swiglu_bwd(dh, x12)


swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager path


class _SwiGLUFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x12):
        ctx.save_for_backward(x12)
        return _fwd(x12)

    @staticmethod
    def backward(ctx, dh):
        (x12,) = ctx.saved_tensors
        return _bwd(dh, x12)


def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """``silu(x1) * x2`` with ``x1, x2 = x12.chunk(2, -1)``, fused (same contract as the reference op).

    Args:
        x12: ``(..., 2 * hidden)``, the w12 Linear's output (fp32/bf16/fp16).

    Returns:
        A contiguous ``(..., hidden)`` tensor of x12's dtype.
    """
    if x12.dim() < 1 or x12.shape[-1] % 2:
        raise ValueError(f"expected x12 of shape (..., 2 * hidden), got {tuple(x12.shape)}")
    x12 = x12.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.sfd_kernels.swiglu_fwd(x12)
    return _SwiGLUFunction.apply(x12)
