"""SwiGLU's input stage with a Triton gate: the ``w12`` Linear, then ``silu(x1 + b1) * (x2 + b2)``.

``x1, x2`` are the halves of ``x @ w12.T`` and ``b1, b2`` those of the Linear's bias. The GEMM
runs without its bias (cuBLAS, as before), and the gate kernel adds it:

- forward: one read of the GEMM's output, one write of the ``w3`` Linear's input;
- backward: one read of that output and of the incoming gradient, one write of the gradient of
  the whole ``x12`` (in place of the split, the two products and the concatenation: 10 bytes per
  hidden unit and token in bf16), and, per program, partial column sums of it, which are the
  bias gradient. A tiny torch ``sum`` finishes them; no atomics, so the result is deterministic.

Inside the compiled XL step on an H100, Inductor's SwiGLU backward ran at about 1.4x those bytes
(118 us against 83), and the w12 bias gradient was a reduction of its own over the same 100 MB
(``triton_red_fused_sum_29``, 35 us per block; benchmarks/NOTES.md). Both neighbours are GEMMs,
so an opaque kernel here costs no fusion.

Numerics: fp32 arithmetic, one rounding to x12's dtype. The reference adds the bias inside the
GEMM (before the GEMM's rounding) and rounds the silu once more in bf16/fp16; the two agree
within the dtype's rounding.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sfd_train.kernels.triton_rms_norm import (_direct, _target_programs, column_vector, or_empty, register_op,
                                              vector_alignment)

# Values per program, warps: 8 values a thread, so 16-byte accesses in bf16.
BLOCK, NUM_WARPS = 1024, 4
# The backward's loop: rows per step and warps (each program walks a run of rows of one column
# block). 2 x 1024 on 8 warps takes 78 registers on sm_90 (triton 3.6 and 3.9): three programs,
# 36 KB of loads in flight per multiprocessor (tests/test_kernels_sm90.py).
BWD_ROWS, BWD_WARPS = 2, 8


@triton.jit
def _swiglu_fwd_kernel(X12, BIAS, H, hidden, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # Program (row, block of hidden units): no division.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    x_row = tl.multiple_of(row * 2 * hidden, ALIGN)
    x1 = tl.load(X12 + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + x_row + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x1 += tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)
        x2 += tl.load(BIAS + hidden + cols, mask=mask, other=0.0).to(tl.float32)
    h = x1 * tl.sigmoid(x1) * x2
    tl.store(H + tl.multiple_of(row * hidden, ALIGN) + cols, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DH, X12, BIAS, DX12, DBIAS_PART, n_rows, hidden, rows_per_program,
                       TILES_PER_PROGRAM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    # Program (s, c) owns rows [s * rows_per_program, (s + 1) * rows_per_program) of column block c.
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < hidden
    first = split * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    b1 = column_vector(BIAS, 0, cols, col_mask, HAS_BIAS, 0.0)
    b2 = column_vector(BIAS, hidden, cols, col_mask, HAS_BIAS, 0.0)
    db1 = tl.zeros([BLOCK], dtype=tl.float32)
    db2 = tl.zeros([BLOCK], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime scalar.
    for tile in range(0, TILES_PER_PROGRAM):
        rows = first + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask = (rows < last)[:, None] & col_mask[None, :]
        x_off = tl.multiple_of(rows.to(tl.int64) * 2 * hidden, ALIGN)[:, None] + cols[None, :]
        h_off = tl.multiple_of(rows.to(tl.int64) * hidden, ALIGN)[:, None] + cols[None, :]
        x1 = tl.load(X12 + x_off, mask=mask, other=0.0).to(tl.float32) + b1[None, :]
        x2 = tl.load(X12 + x_off + hidden, mask=mask, other=0.0).to(tl.float32) + b2[None, :]
        dh = tl.load(DH + h_off, mask=mask, other=0.0).to(tl.float32)
        gate = tl.sigmoid(x1)
        # d silu / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
        dx1 = dh * x2 * gate * (1.0 + x1 * (1.0 - gate))
        dx2 = dh * x1 * gate
        tl.store(DX12 + x_off, dx1.to(DX12.dtype.element_ty), mask=mask)
        tl.store(DX12 + x_off + hidden, dx2.to(DX12.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            # Masked rows load zeros and so contribute zero (dh = 0 there).
            db1 += tl.sum(dx1, axis=0)
            db2 += tl.sum(dx2, axis=0)
    if HAS_BIAS:
        part = split.to(tl.int64) * 2 * hidden + cols
        tl.store(DBIAS_PART + part, db1, mask=col_mask)
        tl.store(DBIAS_PART + part + hidden, db2, mask=col_mask)


def _rows_and_hidden(x12: torch.Tensor) -> Tuple[int, int]:
    two_hidden = int(x12.shape[-1])
    return x12.numel() // two_hidden if two_hidden else 0, two_hidden // 2


def _fwd(x12: torch.Tensor, bias: Optional[torch.Tensor], launch=_direct) -> torch.Tensor:
    x12 = x12.contiguous()
    rows, hidden = _rows_and_hidden(x12)
    h = torch.empty((*x12.shape[:-1], hidden), dtype=x12.dtype, device=x12.device)
    launch(_swiglu_fwd_kernel)[(rows, triton.cdiv(hidden, BLOCK))](
        x12, bias, h, hidden, HAS_BIAS=bias is not None, BLOCK=BLOCK,
        ALIGN=vector_alignment(hidden, x12.element_size()), num_warps=NUM_WARPS)
    return h


def _bwd(dh: torch.Tensor, x12: torch.Tensor, bias: Optional[torch.Tensor],
         launch=_direct) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(d x12, d bias)``; d bias is None without a bias."""
    dh, x12 = dh.contiguous(), x12.contiguous()
    rows, hidden = _rows_and_hidden(x12)
    col_blocks = triton.cdiv(hidden, BLOCK)
    # A few waves of programs over the multiprocessors; each sums its run of rows.
    splits = max(1, min(triton.cdiv(rows, BWD_ROWS), _target_programs(x12.device) // col_blocks))
    rows_per_program = triton.cdiv(triton.cdiv(rows, splits), BWD_ROWS) * BWD_ROWS
    splits = max(1, triton.cdiv(rows, rows_per_program))
    dx12 = torch.empty(x12.shape, dtype=x12.dtype, device=x12.device)
    dbias_part = x12.new_empty((splits, 2 * hidden), dtype=torch.float32) if bias is not None else None
    launch(_swiglu_bwd_kernel)[(splits, col_blocks)](
        dh, x12, bias, dx12, dbias_part, rows, hidden, rows_per_program,
        TILES_PER_PROGRAM=rows_per_program // BWD_ROWS, HAS_BIAS=bias is not None, BLOCK_ROWS=BWD_ROWS, BLOCK=BLOCK,
        ALIGN=vector_alignment(hidden, min(dh.element_size(), x12.element_size())), num_warps=BWD_WARPS)
    return dx12, dbias_part.sum(0).to(bias.dtype) if bias is not None else None


# --------------------------------------------------------------------------- custom ops (torch.compile)


def _fwd_fake(x12, bias):
    return x12.new_empty((*x12.shape[:-1], x12.shape[-1] // 2))


@register_op("sfd_kernels::swiglu_fwd", _fwd_fake)
def swiglu_fwd_op(x12: torch.Tensor, bias: Optional[torch.Tensor], launch=_direct) -> torch.Tensor:
    """Forward: ``silu(x1 + b1) * (x2 + b2)``."""
    return _fwd(x12, bias, launch)


def _bwd_fake(dh, x12, bias):
    return x12.new_empty(x12.shape), bias.new_empty(bias.shape) if bias is not None else x12.new_empty(0)


@register_op("sfd_kernels::swiglu_bwd", _bwd_fake)
def swiglu_bwd_op(dh: torch.Tensor, x12: torch.Tensor, bias: Optional[torch.Tensor],
                  launch=_direct) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward: the gradients of x12 and of the bias (empty without a bias: custom ops cannot return None)."""
    dx12, dbias = _bwd(dh, x12, bias, launch)
    return or_empty(x12, (dx12, dbias))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    x12, bias = ctx.saved_tensors
    dx12, dbias = torch.ops.sfd_kernels.swiglu_bwd(dh, x12, bias)
    return dx12, dbias if bias is not None else None


swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager path


class _SwiGLUFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x12, bias):
        ctx.save_for_backward(x12, bias)
        return _fwd(x12, bias)

    @staticmethod
    def backward(ctx, dh):
        x12, bias = ctx.saved_tensors
        return _bwd(dh, x12, bias)


def swiglu_gate(x12: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(x1 + b1) * (x2 + b2)`` with ``x1, x2 = x12.chunk(2, -1)`` and ``b1, b2 = bias.chunk(2)``.

    Args:
        x12: ``(..., 2 * hidden)``, the w12 GEMM's output without its bias (fp32/bf16/fp16).
        bias: ``(2 * hidden,)`` or None.

    Returns:
        A contiguous ``(..., hidden)`` tensor of x12's dtype.
    """
    if x12.dim() < 1 or x12.shape[-1] % 2:
        raise ValueError(f"expected x12 of shape (..., 2 * hidden), got {tuple(x12.shape)}")
    if bias is not None and bias.shape != x12.shape[-1:]:
        raise ValueError(f"expected a bias of shape ({x12.shape[-1]},), got {tuple(bias.shape)}")
    x12 = x12.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.sfd_kernels.swiglu_fwd(x12, bias)
    return _SwiGLUFunction.apply(x12, bias)


def swiglu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The w12 Linear and SwiGLU's gate (same contract as :func:`sfd_train.kernels.reference.swiglu`).

    The GEMM runs without the bias; the gate kernel adds it, and its backward returns the bias
    gradient from the same pass.
    """
    return swiglu_gate(F.linear(x, weight), bias)
