"""Triton RMSNorm and RMSNorm + adaLN modulation, forward and backward.

One pair of kernels serves both ops (constexpr flags switch the weight, the scale and
the shift on and off):

    y = rms_norm(x) * weight * (1 + scale[b]) + shift[b]

- Statistics and arithmetic in float32 whatever the input dtype (fp32, bf16, fp16).
- The forward saves ``rstd`` (one fp32 per row), so the backward reads x and dy once.
- The backward writes dx and, per program, partial sums of d(weight) (over all rows) and
  of d(scale), d(shift) (over the tokens of one sample); a tiny torch ``sum`` finishes
  them. Each program owns a run of rows of one sample, so no atomics are needed and the
  result is deterministic.
- x may be a strided view (the model's q/k are split from ``qkv`` by a permute): up to
  three leading dimensions are addressed with their own strides, so no copy is made.

Two entry points wrap the kernels with identical numerics:
- the custom ops ``torch.ops.sfd_kernels.rms_norm_fwd/bwd`` with autograd registered, which
  ``torch.compile`` captures without a graph break (``torch.library.triton_op`` on real
  Triton, so Inductor launches the kernels from its own code; ``custom_op`` with a fake
  implementation under the Triton interpreter, whose launches cannot be traced);
- a plain ``torch.autograd.Function`` used in eager mode, where the custom-op dispatch
  adds Python overhead per call to a kernel of tens of microseconds.

Output dtype: under autocast the kernels write the autocast dtype (every consumer of a
norm in the model is a Linear or SDPA, which would cast to it anyway, so this saves a
full read and write of the activation); otherwise x's dtype. The reference returns the
promoted dtype of x and the weight; values agree within the dtype's rounding.
"""

import functools
import inspect
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Widest row one program holds in registers; the model family needs at most 1792.
MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, SHIFT, SCALE, Y, RSTD,
    n_rows, D, rows_per_sample,
    size1, size2, stride0, stride1, stride2,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    # Row r of the flattened leading dims (n0, n1, n2) -> its strided offset in x.
    i2 = rows % size2
    i1 = (rows // size2) % size1
    i0 = rows // (size2 * size1)
    x_off = i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2
    # Row starts are multiples of ALIGN elements (checked by the launcher): lets Triton use
    # 16-byte loads/stores even when D (72 for XL's heads) is not a multiple of 16.
    x_off = tl.multiple_of(x_off, ALIGN)
    x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_SCALE:
        mod_off = (rows // rows_per_sample).to(tl.int64)[:, None] * D + cols[None, :]
        scale = tl.load(SCALE + mod_off, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale)
        if HAS_SHIFT:
            y = y + tl.load(SHIFT + mod_off, mask=mask, other=0.0).to(tl.float32)
    y_off = tl.multiple_of(rows.to(tl.int64) * D, ALIGN)[:, None] + cols[None, :]
    tl.store(Y + y_off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, SCALE, RSTD, DX, DW_PART, DSHIFT_PART, DSCALE_PART,
    rows_per_sample, D, rows_per_program,
    size1, size2, stride0, stride1, stride2,
    TILES_PER_PROGRAM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Program (b, s) owns rows [s * rows_per_program, (s + 1) * rows_per_program) of sample b.
    sample = tl.program_id(0)
    split = tl.program_id(1)
    first = sample * rows_per_sample + split * rows_per_program
    last = sample * rows_per_sample + tl.minimum((split + 1) * rows_per_program, rows_per_sample)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # One sample per program, so its modulation vector is loaded once.
        gain = 1.0 + tl.load(SCALE + sample.to(tl.int64) * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime scalar
    # (one compiled variant per count; training shapes give one or two).
    for tile in range(0, TILES_PER_PROGRAM):
        rows = first + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        i2 = rows % size2
        i1 = (rows // size2) % size1
        i0 = rows // (size2 * size1)
        x_off = i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2
        x_off = tl.multiple_of(x_off, ALIGN)
        x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dense_off = tl.multiple_of(rows.to(tl.int64) * D, ALIGN)[:, None] + cols[None, :]
        dy = tl.load(DY + dense_off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        # y = xhat * w * gain + shift: walk the chain back to d(xhat).
        if HAS_SHIFT:
            dshift_acc += tl.sum(dy, axis=0)
        if HAS_SCALE:
            if HAS_WEIGHT:
                dscale_acc += tl.sum(dy * xhat * w[None, :], axis=0)
            else:
                dscale_acc += tl.sum(dy * xhat, axis=0)
            dy = dy * gain[None, :]
        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
            dy = dy * w[None, :]
        # d(x * rstd) / dx: rstd * (g - xhat * mean(g * xhat)), g = d(xhat).
        proj = tl.sum(dy * xhat, axis=1) / D
        dx = (dy - xhat * proj[:, None]) * rstd[:, None]
        tl.store(DX + dense_off, dx.to(DX.dtype.element_ty), mask=mask)
    part = (sample * tl.num_programs(1) + split).to(tl.int64) * D + cols
    if HAS_WEIGHT:
        tl.store(DW_PART + part, dw_acc, mask=col_mask)
    if HAS_SHIFT:
        tl.store(DSHIFT_PART + part, dshift_acc, mask=col_mask)
    if HAS_SCALE:
        tl.store(DSCALE_PART + part, dscale_acc, mask=col_mask)


# --------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _tile(D: int) -> Tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_ROWS, num_warps)``: about 4K fp32 values per program.

    Narrow rows (the q/k norms over 64-96 channels) take many rows per program so that
    a program still moves a few KiB; wide rows take one or two.
    """
    if D > MAX_HIDDEN:
        raise ValueError(f"Triton RMSNorm supports rows of at most {MAX_HIDDEN} values, got {D}")
    block_d = triton.next_power_of_2(D)
    block_rows = max(1, min(64, 4096 // block_d))
    num_warps = max(1, min(16, block_d * block_rows // 512))
    return block_d, block_rows, num_warps


def _leading_dims(x: torch.Tensor) -> Tuple[int, Tuple[int, int, int], Tuple[int, int, int]]:
    """Rows of x and (sizes, strides) of its leading dims folded into exactly three.

    Adjacent dims that are contiguous with each other are merged; what remains must fit
    in three, else the caller copies x.
    """
    dims = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: list = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 3:
        raise ValueError("too many strided leading dims")
    while len(merged) < 3:
        merged.insert(0, (1, 0))
    rows = merged[0][0] * merged[1][0] * merged[2][0]
    return rows, (merged[0][0], merged[1][0], merged[2][0]), (merged[0][1], merged[1][1], merged[2][1])


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels can address it, else a contiguous copy."""
    if x.stride(-1) != 1:
        return x.contiguous()
    try:
        _leading_dims(x)
    except ValueError:
        return x.contiguous()
    return x


def _alignment(x: torch.Tensor, D: int, strides, dense: tuple) -> int:
    """Largest power of two (at most one 16-byte vector) dividing every row start, in elements.

    Row starts of x are sums of its strides; those of the dense (rows, D) tensors are
    multiples of D. Base pointers must be 16-byte aligned too: allocations are, so a view
    is when its storage offset is (read from the offset, not ``data_ptr()``, so that
    fake tensors can be traced).
    """
    align = 16 // max(t.element_size() for t in (x, *dense))
    for value in (int(D), *(int(s) for s in strides if int(s) != 0)):
        while value % align:
            align //= 2
    for t in (x, *dense):
        if (int(t.storage_offset()) * t.element_size()) % 16:
            return 1
    return max(align, 1)


def vector_alignment(n: int, element_size: int) -> int:
    """Largest power of two, at most one 16-byte vector, that divides n.

    The ``ALIGN`` hint (in elements) for row offsets that are multiples of n.
    """
    align = 16 // element_size
    while n % align:
        align //= 2
    return align


_SM_COUNT: dict = {}


def _target_programs(device: torch.device) -> int:
    """Programs to launch for the backward: a few waves over the multiprocessors."""
    if device.type != "cuda":
        return 8  # the interpreter: still several partial sums, to exercise the reduction
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def _direct(kernel):
    return kernel


def _fwd(
    x: torch.Tensor, weight: Optional[torch.Tensor], shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor], eps: float, out_dtype: torch.dtype, launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _as_kernel_input(x)  # no-op on the public path; guards direct calls of the custom op
    D = x.shape[-1]
    rows, sizes, strides = _leading_dims(x)
    rows_per_sample = x.shape[1] if scale is not None else 1
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    block_d, block_rows, num_warps = _tile(int(D))
    launch(_rms_norm_fwd_kernel)[(triton.cdiv(rows, block_rows),)](
        x, weight, shift, scale, y, rstd,
        rows, D, rows_per_sample,
        sizes[1], sizes[2], strides[0], strides[1], strides[2],
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=_alignment(x, D, strides, (y,)),
        num_warps=num_warps,
    )
    return y, rstd


def _bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], has_shift: bool,
    scale: Optional[torch.Tensor], rstd: torch.Tensor, launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _as_kernel_input(x)
    D = x.shape[-1]
    rows, sizes, strides = _leading_dims(x)
    dy = dy.contiguous()
    if scale is not None:
        samples, rows_per_sample = x.shape[0], x.shape[1]
    else:
        samples, rows_per_sample = 1, rows
    block_d, block_rows, num_warps = _tile(int(D))
    # Enough programs to keep the memory system busy: a few waves over the SMs, and for
    # narrow rows (q/k norms) at most ~4 tiles per program; partial sums stay small.
    target = max(_target_programs(x.device), triton.cdiv(rows, 4 * block_rows))
    splits = max(1, min(triton.cdiv(rows_per_sample, block_rows), target // samples))
    rows_per_program = triton.cdiv(triton.cdiv(rows_per_sample, splits), block_rows) * block_rows
    splits = triton.cdiv(rows_per_sample, rows_per_program)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = (samples * splits, D)
    empty = x.new_empty(0, dtype=torch.float32)
    dw_part = x.new_empty(parts, dtype=torch.float32) if weight is not None else empty
    dshift_part = x.new_empty(parts, dtype=torch.float32) if has_shift else empty
    dscale_part = x.new_empty(parts, dtype=torch.float32) if scale is not None else empty
    launch(_rms_norm_bwd_kernel)[(samples, splits)](
        dy, x, weight, scale, rstd, dx, dw_part, dshift_part, dscale_part,
        rows_per_sample, D, rows_per_program,
        sizes[1], sizes[2], strides[0], strides[1], strides[2],
        TILES_PER_PROGRAM=rows_per_program // block_rows,
        HAS_WEIGHT=weight is not None,
        HAS_SHIFT=has_shift,
        HAS_SCALE=scale is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=_alignment(x, D, strides, (dy, dx)),
        num_warps=num_warps,
    )
    # Finish the reductions; empty tensors stand for "no such input" (custom ops cannot return None).
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    dshift = dshift_part.view(samples, splits, D).sum(1).to(scale.dtype) if has_shift else x.new_empty(0)
    dscale = dscale_part.view(samples, splits, D).sum(1).to(scale.dtype) if scale is not None else x.new_empty(0)
    return dx, dw, dshift, dscale


# --------------------------------------------------------------------------- custom ops (torch.compile)


def register_op(name: str, fake):
    """Registers a Triton-launching function as a custom op that torch.compile captures whole.

    With real Triton (CUDA) it is a ``torch.library.triton_op``: Inductor traces the body
    and emits the kernel launches in its own generated code, so a compiled block pays no
    custom-op dispatch per call. Under the Triton interpreter (CPU tests) the launch cannot
    be traced, so it is a plain ``custom_op`` with the hand-written ``fake``. The kernels
    and launchers are the same either way. Returns a decorator; the decorated function
    takes a ``launch`` keyword (``wrap_triton`` or the identity).
    """

    def decorate(fn):
        traceable = hasattr(torch.library, "triton_op") and not interpreted()
        if traceable:
            from torch.library import triton_op, wrap_triton

            launch = wrap_triton
        else:
            launch = _direct

        def op_fn(*args):
            return fn(*args, launch=launch)

        op_fn.__signature__ = _positional_signature(fn)
        op_fn.__name__ = fn.__name__
        op_fn.__doc__ = fn.__doc__
        if traceable:
            return triton_op(name, op_fn, mutates_args=())
        op = torch.library.custom_op(name, op_fn, mutates_args=())
        op.register_fake(fake)
        return op

    return decorate


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1: the kernels run as Python, with no compiled launch to trace."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return not isinstance(_rms_norm_fwd_kernel, triton.runtime.jit.JITFunction)


def _positional_signature(fn) -> inspect.Signature:
    sig = inspect.signature(fn)
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "launch"])


def _rms_norm_fwd_fake(x, weight, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_op("sfd_kernels::rms_norm_fwd", _rms_norm_fwd_fake)
def rms_norm_fwd_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    eps: float,
    out_dtype: torch.dtype,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(y, rstd)``."""
    return _fwd(x, weight, shift, scale, eps, out_dtype, launch)


def _rms_norm_bwd_fake(dy, x, weight, has_shift, scale, rstd):
    none = x.new_empty(0)
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if weight is not None else none,
        scale.new_empty(scale.shape) if has_shift else none,
        scale.new_empty(scale.shape) if scale is not None else none,
    )


@register_op("sfd_kernels::rms_norm_bwd", _rms_norm_bwd_fake)
def rms_norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    has_shift: bool,
    scale: Optional[torch.Tensor],
    rstd: torch.Tensor,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dweight, dshift, dscale)``; an absent input gets an empty tensor."""
    return _bwd(dy, x, weight, has_shift, scale, rstd, launch)


def _setup_context(ctx, inputs, output):
    x, weight, shift, scale, _eps, _out_dtype = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, scale, rstd)
    ctx.has_shift = shift is not None


def _backward(ctx, dy, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    dx, dw, dshift, dscale = torch.ops.sfd_kernels.rms_norm_bwd(dy, x, weight, ctx.has_shift, scale, rstd)
    return (
        dx,
        dw if weight is not None else None,
        dshift if ctx.has_shift else None,
        dscale if scale is not None else None,
        None,
        None,
    )


rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager path


class _RMSNormFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps, out_dtype):
        y, rstd = _fwd(x, weight, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x, weight, scale, rstd)
        ctx.has_shift = shift is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, rstd = ctx.saved_tensors
        dx, dw, dshift, dscale = _bwd(dy, x, weight, ctx.has_shift, scale, rstd)
        return (
            dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            dshift if ctx.has_shift and ctx.needs_input_grad[2] else None,
            dscale if scale is not None and ctx.needs_input_grad[3] else None,
            None,
            None,
        )


# --------------------------------------------------------------------------- public ops


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _apply(x, weight, shift, scale, eps):
    x = _as_kernel_input(x)
    if torch.compiler.is_compiling():
        return torch.ops.sfd_kernels.rms_norm_fwd(x, weight, shift, scale, eps, _output_dtype(x))[0]
    return _RMSNormFunction.apply(x, weight, shift, scale, eps, _output_dtype(x))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape), times ``weight`` when given.

    Args:
        x: ``(..., D)``, fp32/bf16/fp16; may be a strided view with a unit last stride.
        weight: ``(D,)`` or None.
        eps: added to the mean square.

    Returns:
        A contiguous tensor of x's shape (dtype: see the module docstring).
    """
    return _apply(x, weight, None, None, eps)


def rms_norm_modulate(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``rms_norm(x, weight) * (1 + scale) + shift`` in one pass.

    Args:
        x: ``(B, N, D)`` hidden states.
        weight: ``(D,)`` or None.
        shift: ``(B, D)`` or None (the model's ``wo_shift``).
        scale: ``(B, D)``.
        eps: added to the mean square.
    """
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"expected x (B, N, D) and scale (B, D), got {tuple(x.shape)} and {tuple(scale.shape)}")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} must match scale {tuple(scale.shape)}")
    shift = shift.contiguous() if shift is not None else None
    return _apply(x, weight, shift, scale.contiguous(), eps)
