"""Triton RMSNorm, RMSNorm + adaLN modulation, and the gated residual + RMSNorm + modulation, forward and backward.

One pair of kernels serves all three ops (constexpr flags switch the residual, the weight, the
scale and the shift on and off)::

    x_new = x + gate[b] * branch                      (the residual, when given)
    y = rms_norm(x_new) * weight * (1 + scale[b]) + shift[b]

- Statistics and arithmetic in float32 whatever the input dtype (fp32, bf16, fp16).
- The forward saves ``rstd`` (one fp32 per row), so the backward reads x and dy once.
- The backward writes dx and, per program, partial sums of d(weight) (over all rows) and
  of d(scale), d(shift), d(gate) (over the tokens of one sample); a tiny torch ``sum`` finishes
  them. Each program owns a run of rows of one sample, so no atomics are needed and the
  result is deterministic. It holds a row in registers as two power-of-two pieces (1152 =
  1024 + 128), not one padded to 2048: at XL's width that cuts its registers by about 40%, so
  the loads in flight per multiprocessor double (tests/test_kernels_sm90.py).
- The residual form serves the one residual add inside a block that a norm reads next: the
  attention's gated output added to the stream, then ``norm2`` with the MLP's modulation. Its
  backward takes the norm's gradient and the stream's own, and returns those of x, branch and
  gate in the same pass. Inside the compiled XL step Inductor spent about 6 ms per step on such
  backwards and the per-sample sums at both residual adds (benchmarks/NOTES.md); its bytes
  (18 per element) allow about half that.
- x may be a strided view (the model's q/k are split from ``qkv`` by a permute): up to
  three leading dimensions are addressed with their own strides, so no copy is made.

Two entry points wrap the kernels with identical numerics:
- the custom ops ``torch.ops.sfd_kernels.{rms_norm,add_rms_norm}_{fwd,bwd}`` with autograd
  registered, which ``torch.compile`` captures without a graph break (``torch.library.triton_op`` on real
  Triton, so Inductor launches the kernels from its own code; ``custom_op`` with a fake
  implementation under the Triton interpreter, whose launches cannot be traced);
- a plain ``torch.autograd.Function`` used in eager mode, where the custom-op dispatch
  adds Python overhead per call to a kernel of tens of microseconds.

Output dtype: under autocast the kernels write the autocast dtype (every consumer of a
norm in the model is a Linear or SDPA, which would cast to it anyway, so this saves a
full read and write of the activation); otherwise x's dtype. The reference returns the
promoted dtype of x and the weight; values agree within the dtype's rounding. The stream
``x_new`` has PyTorch's promoted dtype of x, branch and gate (fp32 for the model's stream);
the kernel adds ``gate * branch`` in fp32 where the reference rounds the product to bf16 first.
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
def _fwd_piece_input(X, BRANCH, GATE, X_OUT, x_off, dense_off, mod_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """One column piece of a tile of x (fp32); with the residual, ``x + gate[b] * branch``, also stored."""
    x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Added in fp32; the norm reads the stored (rounded) sum, which is what the backward reads back.
        offsets = dense_off[:, None] + cols[None, :]
        gate = tl.load(GATE + mod_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        branch = tl.load(BRANCH + offsets, mask=mask, other=0.0).to(tl.float32)
        x_out = (x + gate * branch).to(X_OUT.dtype.element_ty)
        tl.store(X_OUT + offsets, x_out, mask=mask)
        x = x_out.to(tl.float32)
    return x


@triton.jit
def _fwd_piece_output(Y, W, SHIFT, SCALE, dense_off, mod_row, cols, mask, col_mask, x, rstd,
                      HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Stores one column piece of ``y = x * rstd * w * (1 + scale[b]) + shift[b]``."""
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        mod_off = mod_row[:, None] + cols[None, :]
        y = y * (1.0 + tl.load(SCALE + mod_off, mask=mask, other=0.0).to(tl.float32))
        if HAS_SHIFT:
            y = y + tl.load(SHIFT + mod_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + dense_off[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(
    X, BRANCH, GATE, W, SHIFT, SCALE, X_OUT, Y, RSTD,
    n_rows, D, rows_per_sample,
    size1, size2, stride0, stride1, stride2,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PIECE_A: tl.constexpr,
    PIECE_B: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # A row as two power-of-two pieces, as in the backward (see _row_tile).
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols_a = tl.arange(0, PIECE_A)
    cols_b = PIECE_A + tl.arange(0, PIECE_B)
    row_mask = rows < n_rows
    mask_a = cols_a < D
    mask_b = cols_b < D
    tile_a = row_mask[:, None] & mask_a[None, :]
    tile_b = row_mask[:, None] & mask_b[None, :]
    # Row r of the flattened leading dims (n0, n1, n2) -> its strided offset in x.
    i2 = rows % size2
    i1 = (rows // size2) % size1
    i0 = rows // (size2 * size1)
    x_off = i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2
    # Row starts are multiples of ALIGN elements (checked by the launcher): lets Triton use
    # 16-byte loads/stores even when D (72 for XL's heads) is not a multiple of 16.
    x_off = tl.multiple_of(x_off, ALIGN)
    dense_off = tl.multiple_of(rows.to(tl.int64) * D, ALIGN)
    mod_row = (rows // rows_per_sample).to(tl.int64) * D
    x_a = _fwd_piece_input(X, BRANCH, GATE, X_OUT, x_off, dense_off, mod_row, cols_a, tile_a, HAS_RESIDUAL)
    x_b = _fwd_piece_input(X, BRANCH, GATE, X_OUT, x_off, dense_off, mod_row, cols_b, tile_b, HAS_RESIDUAL)
    rstd = tl.rsqrt((tl.sum(x_a * x_a, axis=1) + tl.sum(x_b * x_b, axis=1)) / D + eps)
    _fwd_piece_output(Y, W, SHIFT, SCALE, dense_off, mod_row, cols_a, tile_a, mask_a, x_a, rstd,
                      HAS_WEIGHT, HAS_SHIFT, HAS_SCALE)
    _fwd_piece_output(Y, W, SHIFT, SCALE, dense_off, mod_row, cols_b, tile_b, mask_b, x_b, rstd,
                      HAS_WEIGHT, HAS_SHIFT, HAS_SCALE)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def column_vector(PTR, row, cols, mask, PRESENT: tl.constexpr, ABSENT: tl.constexpr):
    """A per-column vector (weight, scale, gate, bias) over ``cols`` in fp32; ``ABSENT`` for an absent input."""
    if PRESENT:
        vector = tl.load(PTR + row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        vector = tl.full(cols.shape, ABSENT, dtype=tl.float32)
    return vector


@triton.jit
def _bwd_piece_sums(X, DY, x_off, dense_off, cols, mask, rstd, w, gain, HAS_WEIGHT: tl.constexpr,
                    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One column piece of a tile: ``(xhat, g = d(xhat), column sums of dy, of dy * xhat, row sums of g * xhat)``.

    A column sum that no output needs is zeros (not computed).
    """
    x = tl.load(X + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + dense_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = x * rstd[:, None]
    sum_dy = tl.zeros(cols.shape, dtype=tl.float32)
    sum_dy_xhat = tl.zeros(cols.shape, dtype=tl.float32)
    if HAS_SHIFT:
        sum_dy = tl.sum(dy, axis=0)
    if HAS_WEIGHT or HAS_SCALE:
        sum_dy_xhat = tl.sum(dy * xhat, axis=0)
    # y = xhat * w * gain + shift: walk the chain back to d(xhat).
    g = dy
    if HAS_SCALE:
        g = g * gain[None, :]
    if HAS_WEIGHT:
        g = g * w[None, :]
    return xhat, g, sum_dy, sum_dy_xhat, tl.sum(g * xhat, axis=1)


@triton.jit
def _bwd_piece_store(DX, DX_OUT, BRANCH, DBRANCH, dense_off, cols, mask, xhat, g, proj, rstd, gate,
                     HAS_RESIDUAL: tl.constexpr, HAS_DX_OUT: tl.constexpr):
    """Writes one column piece of dx (and of dbranch); returns its column sums of dx * branch (d(gate))."""
    offsets = dense_off[:, None] + cols[None, :]
    # d(x * rstd) / dx: rstd * (g - xhat * mean(g * xhat)).
    dx = (g - xhat * proj[:, None]) * rstd[:, None]
    dgate = tl.zeros_like(gate)
    if HAS_RESIDUAL:
        # x was x_in + gate[b] * branch: its gradient (plus the one from the stream's later
        # readers, DX_OUT) flows to x_in unchanged, and to branch and gate through the product.
        if HAS_DX_OUT:
            dx += tl.load(DX_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
        branch = tl.load(BRANCH + offsets, mask=mask, other=0.0).to(tl.float32)
        dgate = tl.sum(dx * branch, axis=0)
        tl.store(DBRANCH + offsets, (dx * gate[None, :]).to(DBRANCH.dtype.element_ty), mask=mask)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    return dgate


@triton.jit
def _bwd_piece_parts(DW_PART, DSHIFT_PART, DSCALE_PART, DGATE_PART, part, cols, col_mask, dy_xhat, dshift, dgate,
                     w, gain, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_SCALE: tl.constexpr):
    """Stores one column piece of the program's partial sums.

    d(weight) and d(scale) are both the column sums of dy * xhat times the product's other
    factor; the program's rows are of one sample, so that factor is one vector for all of them
    (ones when it is absent).
    """
    if HAS_WEIGHT:
        tl.store(DW_PART + part + cols, dy_xhat * gain, mask=col_mask)
    if HAS_SHIFT:
        tl.store(DSHIFT_PART + part + cols, dshift, mask=col_mask)
    if HAS_SCALE:
        tl.store(DSCALE_PART + part + cols, dy_xhat * w, mask=col_mask)
    if HAS_RESIDUAL:
        tl.store(DGATE_PART + part + cols, dgate, mask=col_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, SCALE, RSTD, DX, DW_PART, DSHIFT_PART, DSCALE_PART,
    DX_OUT, BRANCH, GATE, DBRANCH, DGATE_PART,
    rows_per_sample, D, rows_per_program,
    size1, size2, stride0, stride1, stride2,
    TILES_PER_PROGRAM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DX_OUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    PIECE_A: tl.constexpr,
    PIECE_B: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # A row is held in registers as two power-of-two pieces, [0, PIECE_A) and [PIECE_A, PIECE_A +
    # PIECE_B), so that 1152 channels take 1024 + 128 lanes rather than 2048: the padding would
    # otherwise cost a multiprocessor half its loads in flight (tests/test_kernels_sm90.py).
    # Program (b, s) owns rows [s * rows_per_program, (s + 1) * rows_per_program) of sample b.
    sample = tl.program_id(0)
    split = tl.program_id(1)
    first = sample * rows_per_sample + split * rows_per_program
    last = sample * rows_per_sample + tl.minimum((split + 1) * rows_per_program, rows_per_sample)
    cols_a = tl.arange(0, PIECE_A)
    cols_b = PIECE_A + tl.arange(0, PIECE_B)
    mask_a = cols_a < D
    mask_b = cols_b < D
    # Per-sample vectors (one sample per program when there is a scale), loaded once.
    mod_row = sample.to(tl.int64) * D
    # An absent weight is ones and an absent scale zeros: the chain below multiplies by them exactly.
    w_a = column_vector(W, 0, cols_a, mask_a, HAS_WEIGHT, 1.0)
    w_b = column_vector(W, 0, cols_b, mask_b, HAS_WEIGHT, 1.0)
    gain_a = 1.0 + column_vector(SCALE, mod_row, cols_a, mask_a, HAS_SCALE, 0.0)
    gain_b = 1.0 + column_vector(SCALE, mod_row, cols_b, mask_b, HAS_SCALE, 0.0)
    gate_a = column_vector(GATE, mod_row, cols_a, mask_a, HAS_RESIDUAL, 0.0)
    gate_b = column_vector(GATE, mod_row, cols_b, mask_b, HAS_RESIDUAL, 0.0)
    dshift_a = tl.zeros([PIECE_A], dtype=tl.float32)
    dshift_b = tl.zeros([PIECE_B], dtype=tl.float32)
    dy_xhat_a = tl.zeros([PIECE_A], dtype=tl.float32)
    dy_xhat_b = tl.zeros([PIECE_B], dtype=tl.float32)
    dgate_a = tl.zeros([PIECE_A], dtype=tl.float32)
    dgate_b = tl.zeros([PIECE_B], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime scalar
    # (one compiled variant per count; training shapes give one or two).
    for tile in range(0, TILES_PER_PROGRAM):
        rows = first + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < last
        i2 = rows % size2
        i1 = (rows // size2) % size1
        i0 = rows // (size2 * size1)
        x_off = i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2
        x_off = tl.multiple_of(x_off, ALIGN)
        dense_off = tl.multiple_of(rows.to(tl.int64) * D, ALIGN)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        tile_a = row_mask[:, None] & mask_a[None, :]
        tile_b = row_mask[:, None] & mask_b[None, :]
        xhat_a, g_a, sum_dy, sum_dy_xhat, proj_a = _bwd_piece_sums(X, DY, x_off, dense_off, cols_a, tile_a, rstd,
                                                                   w_a, gain_a, HAS_WEIGHT, HAS_SHIFT,
                                                                   HAS_SCALE)
        dshift_a += sum_dy
        dy_xhat_a += sum_dy_xhat
        xhat_b, g_b, sum_dy, sum_dy_xhat, proj_b = _bwd_piece_sums(X, DY, x_off, dense_off, cols_b, tile_b, rstd,
                                                                   w_b, gain_b, HAS_WEIGHT, HAS_SHIFT,
                                                                   HAS_SCALE)
        dshift_b += sum_dy
        dy_xhat_b += sum_dy_xhat
        proj = (proj_a + proj_b) / D
        dgate_a += _bwd_piece_store(DX, DX_OUT, BRANCH, DBRANCH, dense_off, cols_a, tile_a, xhat_a, g_a, proj, rstd,
                                    gate_a, HAS_RESIDUAL, HAS_DX_OUT)
        dgate_b += _bwd_piece_store(DX, DX_OUT, BRANCH, DBRANCH, dense_off, cols_b, tile_b, xhat_b, g_b, proj, rstd,
                                    gate_b, HAS_RESIDUAL, HAS_DX_OUT)
    part = (sample * tl.num_programs(1) + split).to(tl.int64) * D
    _bwd_piece_parts(DW_PART, DSHIFT_PART, DSCALE_PART, DGATE_PART, part, cols_a, mask_a, dy_xhat_a, dshift_a,
                     dgate_a, w_a, gain_a, HAS_RESIDUAL, HAS_WEIGHT, HAS_SHIFT, HAS_SCALE)
    _bwd_piece_parts(DW_PART, DSHIFT_PART, DSCALE_PART, DGATE_PART, part, cols_b, mask_b, dy_xhat_b, dshift_b,
                     dgate_b, w_b, gain_b, HAS_RESIDUAL, HAS_WEIGHT, HAS_SHIFT, HAS_SCALE)


# --------------------------------------------------------------------------- launchers


# Values per program of the forward and the backward. The backward holds a tile per row piece for
# its whole loop step, and its per-column sums besides.
FWD_VALUES, BWD_VALUES = 2304, 4608


@functools.lru_cache(maxsize=None)
def _row_tile(D: int, values: int) -> Tuple[int, int, int, int]:
    """``(PIECE_A, PIECE_B, BLOCK_ROWS, num_warps)`` for rows of D and about ``values`` per program.

    A row is held as two power-of-two pieces. ``PIECE_A`` is the largest power of two up to D and
    ``PIECE_B`` covers the rest (at least 16 lanes, all masked when D is a power of two), so 1152
    takes 1152 lanes, not 2048. About 9 values per thread. At XL's width the backward (4608) is 4
    rows on 16 warps: 113 registers for the fused residual backward with triton 3.9, 124 with 3.6,
    54 KiB of loads in flight per multiprocessor. The forward (2304) is 2 rows on 8 warps. The
    padded row would take 1.7x the registers (tests/test_kernels_sm90.py).
    """
    if D > MAX_HIDDEN:
        raise ValueError(f"Triton RMSNorm supports rows of at most {MAX_HIDDEN} values, got {D}")
    piece_a = 1 << (int(D).bit_length() - 1)
    piece_b = max(16, triton.next_power_of_2(D - piece_a)) if D > piece_a else 16
    width = piece_a + piece_b
    block_rows = 1 << max(0, min(6, (values // width).bit_length() - 1))
    num_warps = 1 << max(0, min(4, (block_rows * width // 256).bit_length() - 1))
    return piece_a, piece_b, block_rows, num_warps


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
    element_size = max(t.element_size() for t in (x, *dense))
    align = min(vector_alignment(value, element_size) for value in (int(D), *(int(s) for s in strides if int(s) != 0)))
    for t in (x, *dense):
        if (int(t.storage_offset()) * t.element_size()) % 16:
            return 1
    return align


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
    residual: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(y, rstd, x_new)``; with ``residual = (branch, gate)`` x is first replaced by
    ``x_new = x + gate[b] * branch`` (contiguous ``(B, N, D)`` operands, scale given), else x_new is None."""
    x = _as_kernel_input(x)  # no-op on the public path; guards direct calls of the custom op
    D = x.shape[-1]
    rows, sizes, strides = _leading_dims(x)
    rows_per_sample = x.shape[1] if scale is not None else 1
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    branch, gate = residual if residual is not None else (None, None)
    x_new = None
    dense: tuple = (y,)
    if residual is not None:
        x_new = torch.empty(x.shape, dtype=_residual_dtype(x, branch, gate), device=x.device)
        dense = (y, branch, x_new)
    piece_a, piece_b, block_rows, num_warps = _row_tile(int(D), FWD_VALUES)
    launch(_rms_norm_fwd_kernel)[(triton.cdiv(rows, block_rows),)](
        x, branch, gate, weight, shift, scale, x_new, y, rstd,
        rows, D, rows_per_sample,
        sizes[1], sizes[2], strides[0], strides[1], strides[2],
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None,
        BLOCK_ROWS=block_rows,
        PIECE_A=piece_a,
        PIECE_B=piece_b,
        ALIGN=_alignment(x, D, strides, dense),
        num_warps=num_warps,
    )
    return y, rstd, x_new


def _residual_dtype(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.dtype:
    """The dtype of ``x + gate * branch`` under PyTorch's promotion (the residual stream keeps x's fp32)."""
    return torch.promote_types(x.dtype, torch.promote_types(branch.dtype, gate.dtype))


def _bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], has_shift: bool,
    scale: Optional[torch.Tensor], rstd: torch.Tensor, launch=_direct,
    residual: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, dx_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """``(dx, dweight, dshift, dscale, dbranch, dgate)``; an absent input's gradient is None.

    With ``residual = (branch, gate)``, x is the forward's ``x_new`` and ``dx_out`` the gradient
    that the stream's later readers sent to it (None: none did); dx is then the gradient of
    the op's input x, and dbranch, dgate those of the residual's operands.
    """
    x = _as_kernel_input(x)
    D = x.shape[-1]
    rows, sizes, strides = _leading_dims(x)
    dy = dy.contiguous()
    if scale is not None:
        samples, rows_per_sample = x.shape[0], x.shape[1]
    else:
        samples, rows_per_sample = 1, rows
    piece_a, piece_b, block_rows, num_warps = _row_tile(int(D), BWD_VALUES)
    # Enough programs to keep the memory system busy: a few waves over the SMs, and for
    # narrow rows (q/k norms) at most ~4 tiles per program; partial sums stay small.
    target = max(_target_programs(x.device), triton.cdiv(rows, 4 * block_rows))
    splits = max(1, min(triton.cdiv(rows_per_sample, block_rows), target // samples))
    rows_per_program = triton.cdiv(triton.cdiv(rows_per_sample, splits), block_rows) * block_rows
    splits = triton.cdiv(rows_per_sample, rows_per_program)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    parts = (samples * splits, D)

    def partial_sums(wanted: bool) -> Optional[torch.Tensor]:
        return x.new_empty(parts, dtype=torch.float32) if wanted else None

    dw_part, dshift_part, dscale_part = partial_sums(weight is not None), partial_sums(has_shift), partial_sums(
        scale is not None)
    branch, gate = residual if residual is not None else (None, None)
    dbranch = torch.empty_like(branch) if residual is not None else None
    dgate_part = partial_sums(residual is not None)
    dx_out = dx_out.contiguous() if dx_out is not None else None
    dense = (dy, dx) if residual is None else (dy, dx, branch, dbranch, *((dx_out,) if dx_out is not None else ()))
    launch(_rms_norm_bwd_kernel)[(samples, splits)](
        dy, x, weight, scale, rstd, dx, dw_part, dshift_part, dscale_part,
        dx_out, branch, gate, dbranch, dgate_part,
        rows_per_sample, D, rows_per_program,
        sizes[1], sizes[2], strides[0], strides[1], strides[2],
        TILES_PER_PROGRAM=rows_per_program // block_rows,
        HAS_RESIDUAL=residual is not None,
        HAS_DX_OUT=dx_out is not None,
        HAS_WEIGHT=weight is not None,
        HAS_SHIFT=has_shift,
        HAS_SCALE=scale is not None,
        BLOCK_ROWS=block_rows,
        PIECE_A=piece_a,
        PIECE_B=piece_b,
        ALIGN=_alignment(x, D, strides, dense),
        num_warps=num_warps,
    )

    def per_sample(part: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return part.view(samples, splits, D).sum(1).to(like.dtype) if part is not None else None

    # Finish the reductions (a tiny torch sum over the programs' partial sums).
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dw, per_sample(dshift_part, scale), per_sample(dscale_part, scale), dbranch, per_sample(dgate_part, gate)


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
    return _fwd(x, weight, shift, scale, eps, out_dtype, launch)[:2]


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
    return or_empty(x, _bwd(dy, x, weight, has_shift, scale, rstd, launch)[:4])


def or_empty(x: torch.Tensor, grads) -> tuple:
    """None -> an empty tensor (custom ops cannot return None)."""
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


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


def _add_fwd_fake(x, branch, gate, weight, shift, scale, eps, out_dtype):
    return (
        x.new_empty(x.shape, dtype=_residual_dtype(x, branch, gate)),
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@register_op("sfd_kernels::add_rms_norm_fwd", _add_fwd_fake)
def add_rms_norm_fwd_op(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the gated residual + norm + modulation: ``(x_new, y, rstd)``."""
    y, rstd, x_new = _fwd(x, weight, shift, scale, eps, out_dtype, launch, residual=(branch, gate))
    return x_new, y, rstd


def _add_bwd_fake(dy, dx_out, x_new, branch, gate, weight, has_shift, scale, rstd):
    none = x_new.new_empty(0)
    return (
        x_new.new_empty(x_new.shape),
        branch.new_empty(branch.shape),
        gate.new_empty(gate.shape),
        weight.new_empty(weight.shape) if weight is not None else none,
        scale.new_empty(scale.shape) if has_shift else none,
        scale.new_empty(scale.shape),
    )


@register_op("sfd_kernels::add_rms_norm_bwd", _add_bwd_fake)
def add_rms_norm_bwd_op(
    dy: torch.Tensor,
    dx_out: Optional[torch.Tensor],
    x_new: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: Optional[torch.Tensor],
    has_shift: bool,
    scale: torch.Tensor,
    rstd: torch.Tensor,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dbranch, dgate, dweight, dshift, dscale)``; an absent input gets an empty tensor."""
    dx, dw, dshift, dscale, dbranch, dgate = _bwd(dy, x_new, weight, has_shift, scale, rstd, launch,
                                                  residual=(branch, gate), dx_out=dx_out)
    return or_empty(x_new, (dx, dbranch, dgate, dw, dshift, dscale))


def _add_setup_context(ctx, inputs, output):
    _x, branch, gate, weight, shift, scale, _eps, _out_dtype = inputs
    x_new, _y, rstd = output
    ctx.save_for_backward(x_new, branch, gate, weight, scale, rstd)
    ctx.has_shift = shift is not None


def _add_backward(ctx, dx_out, dy, _drstd):
    x_new, branch, gate, weight, scale, rstd = ctx.saved_tensors
    if dy is None:  # only the stream reached the loss
        dy = torch.zeros_like(x_new)
    dx, dbranch, dgate, dw, dshift, dscale = torch.ops.sfd_kernels.add_rms_norm_bwd(
        dy, dx_out, x_new, branch, gate, weight, ctx.has_shift, scale, rstd)
    return dx, dbranch, dgate, dw if weight is not None else None, dshift if ctx.has_shift else None, dscale, None, None


add_rms_norm_fwd_op.register_autograd(_add_backward, setup_context=_add_setup_context)


# --------------------------------------------------------------------------- eager path


class _RMSNormFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps, out_dtype):
        y, rstd, _ = _fwd(x, weight, shift, scale, eps, out_dtype)
        ctx.save_for_backward(x, weight, scale, rstd)
        ctx.has_shift = shift is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale, rstd = ctx.saved_tensors
        dx, dw, dshift, dscale, _, _ = _bwd(dy, x, weight, ctx.has_shift, scale, rstd)
        return _if_needed(ctx, dx, dw, dshift, dscale, None, None)


class _AddRMSNormFunction(torch.autograd.Function):
    """The gated residual + norm + modulation kernels launched directly (eager mode)."""

    @staticmethod
    def forward(ctx, x, branch, gate, weight, shift, scale, eps, out_dtype):
        y, rstd, x_new = _fwd(x, weight, shift, scale, eps, out_dtype, residual=(branch, gate))
        ctx.save_for_backward(x_new, branch, gate, weight, scale, rstd)
        ctx.has_shift = shift is not None
        ctx.set_materialize_grads(False)  # a stream that nothing downstream read sends no gradient
        return x_new, y

    @staticmethod
    def backward(ctx, dx_out, dy):
        x_new, branch, gate, weight, scale, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x_new)
        dx, dw, dshift, dscale, dbranch, dgate = _bwd(dy, x_new, weight, ctx.has_shift, scale, rstd,
                                                      residual=(branch, gate), dx_out=dx_out)
        return _if_needed(ctx, dx, dbranch, dgate, dw, dshift, dscale, None, None)


def _if_needed(ctx, *grads) -> tuple:
    """Each gradient where autograd asked for it, else None."""
    return tuple(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad))


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


def _check_modulation(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> None:
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"expected x (B, N, D) and scale (B, D), got {tuple(x.shape)} and {tuple(scale.shape)}")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} must match scale {tuple(scale.shape)}")


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
    _check_modulation(x, shift, scale)
    shift = shift.contiguous() if shift is not None else None
    return _apply(x, weight, shift, scale.contiguous(), eps)


def add_rms_norm_modulate(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gated residual and the next pre-norm in one pass each way (same contract as the reference op).

    ``x_new = x + gate * branch``; ``y = rms_norm(x_new, weight) * (1 + scale) + shift``.

    Args:
        x: ``(B, N, D)``, the residual stream.
        branch: ``(B, N, D)``, the output of the previous attention or MLP.
        gate: ``(B, D)``, its adaLN gate.
        weight, shift, scale, eps: as in :func:`rms_norm_modulate`.

    Returns:
        ``(x_new, y)``: the stream (PyTorch's promoted dtype of x, branch and gate) and the
        normalised, modulated activation (dtype: see the module docstring).
    """
    _check_modulation(x, shift, scale)
    if branch.shape != x.shape or gate.shape != scale.shape:
        raise ValueError(f"expected branch {tuple(x.shape)} and gate {tuple(scale.shape)}, "
                         f"got {tuple(branch.shape)} and {tuple(gate.shape)}")
    args = (x.contiguous(), branch.contiguous(), gate.contiguous(), weight,
            shift.contiguous() if shift is not None else None, scale.contiguous(), eps, _output_dtype(x))
    if torch.compiler.is_compiling():
        x_new, y, _ = torch.ops.sfd_kernels.add_rms_norm_fwd(*args)
        return x_new, y
    return _AddRMSNormFunction.apply(*args)
