"""Rotary position embedding in one pass (Triton), forward and backward.

``out = x * cos + rotate_pairs(x) * sin`` with ``rotate_pairs(x0, x1) = (-x1, x0)`` on
adjacent pairs and tables ``(N, D_h)`` indexed by the token (the second-to-last dim of
x). The eager reference takes six kernels (split, negate, stack, two products, a sum)
and promotes bf16 activations to fp32 because the tables are fp32 buffers; this kernel
reads x once, computes in fp32 and writes x's dtype, which is what the model casts the
result to before attention anyway.

The backward is the same kernel with the rotation transposed:
``dx_even = dy_even * cos_even + dy_odd * sin_odd``,
``dx_odd = dy_odd * cos_odd - dy_even * sin_even``. The tables get no gradient (they
are fixed buffers). The tables are read in fp32 (they are fp32 buffers in the model).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from sfd_train.kernels.triton_rms_norm import _as_kernel_input, _direct, _leading_dims, register_op


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    numel, D, tokens,
    size1, size2, stride0, stride1, stride2,
    INVERSE: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Flat over the output's elements (no padding of a 72-wide row up to 128 lanes), with
    # 32-bit index arithmetic unless the tensors need 64 (64-bit division is slow on GPUs).
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        idx = idx.to(tl.int64)
    mask = idx < numel
    row = idx // D
    col = idx - row * D
    if CONTIGUOUS:
        x_ptr = X + idx
        partner_ptr = X + (idx ^ 1)  # D is even, so idx and col have the same parity
    else:
        i2 = row % size2
        i1 = (row // size2) % size1
        i0 = row // (size2 * size1)
        x_base = i0 * stride0 + i1 * stride1 + i2 * stride2
        x_ptr = X + x_base + col
        partner_ptr = X + x_base + (col ^ 1)
    # The pair partner (2j <-> 2j+1) comes from the same cache lines as x.
    x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(partner_ptr, mask=mask, other=0.0).to(tl.float32)
    table = (row % tokens) * D
    cos = tl.load(COS + table + col, mask=mask, other=0.0)
    # rotate_pairs: slot 2j gets -x[2j+1], slot 2j+1 gets x[2j].
    sign = tl.where(col % 2 == 0, -1.0, 1.0)
    if INVERSE:
        # Transposed rotation: dx = dy * cos - sign * dy[partner] * sin[partner].
        sin_partner = tl.load(SIN + table + (col ^ 1), mask=mask, other=0.0)
        y = x * cos - sign * x_partner * sin_partner
    else:
        sin = tl.load(SIN + table + col, mask=mask, other=0.0)
        y = x * cos + sign * x_partner * sin
    tl.store(Y + idx, y.to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, launch=_direct) -> torch.Tensor:
    x = _as_kernel_input(x)
    D = x.shape[-1]
    rows, sizes, strides = _leading_dims(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = rows * D
    # The largest element offset touched in x (strided) or y, against the int32 range.
    span = max(numel, 1 + sum((n - 1) * st for n, st in zip(sizes, strides)) + D)
    block = 1024
    launch(_rope_kernel)[(triton.cdiv(numel, block),)](
        x, cos, sin, y,
        numel, D, x.shape[-2],
        sizes[1], sizes[2], strides[0], strides[1], strides[2],
        INVERSE=inverse,
        CONTIGUOUS=x.is_contiguous(),
        INT64=span >= 2**31 - 1024,
        BLOCK=block,
        num_warps=4,
    )
    return y


def _rope_fake(x, cos, sin, inverse):
    return x.new_empty(x.shape)


@register_op("sfd_kernels::rope", _rope_fake)
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, launch=_direct) -> torch.Tensor:
    """``x * cos + rotate_pairs(x) * sin`` (or its transpose when ``inverse``)."""
    return _launch(x, cos, sin, inverse, launch)


def _rope_setup_context(ctx, inputs, output):
    _x, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.sfd_kernels.rope(dy.contiguous(), cos, sin, not ctx.inverse), None, None, None


rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class _RopeFunction(torch.autograd.Function):
    """The same kernel launched directly (eager mode skips the dispatcher)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy.contiguous(), cos, sin, True), None, None


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2 or cos.shape != (x.shape[-2], x.shape[-1]) or sin.shape != cos.shape or x.shape[-1] % 2:
        raise ValueError(
            f"expected x (..., N, D_h) with even D_h and tables (N, D_h); got x {tuple(x.shape)}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("the fused RoPE gives no gradient to the tables; use the reference for trainable tables")
    return cos.contiguous(), sin.contiguous()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in one kernel.

    Args:
        x: ``(..., N, D_h)`` queries or keys (may be strided, unit last stride).
        cos, sin: ``(N, D_h)`` tables, each frequency in two adjacent slots.

    Returns:
        A contiguous tensor of x's shape and dtype.
    """
    cos, sin = _check(x, cos, sin)
    x = _as_kernel_input(x)
    if torch.compiler.is_compiling():
        return torch.ops.sfd_kernels.rope(x, cos, sin, False)
    return _RopeFunction.apply(x, cos, sin)
