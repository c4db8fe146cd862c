"""The attention's input stage with one Triton kernel each way: the qkv bias, q/k RMSNorm, RoPE, head layout.

The ``qkv`` GEMM runs without its bias (cuBLAS). Forward, from its output viewed as
``(B, N, 3, H, D_h)`` and the bias viewed as ``(3, H, D_h)``::

    q = rope(rms_norm(qkv[:, :, 0] + bias[0]) * q_weight)      -> (B, H, N, D_h), contiguous
    k = rope(rms_norm(qkv[:, :, 1] + bias[1]) * k_weight)      -> (B, H, N, D_h), contiguous
    v = qkv[:, :, 2] + bias[2]                                  -> (B, H, N, D_h), contiguous

Backward, from SDPA's ``dq, dk, dv``: one pass writes ``d(qkv)`` straight in the Linear's
``(B, N, 3, H, D_h)`` layout, with the RoPE transpose and the RMSNorm backward applied to the
q and k slots, and per-program partial sums of ``d(q_weight)``, ``d(k_weight)`` and of d(qkv)
itself, which is the bias gradient. Each backward program owns a run of tokens of one (sample,
head), so its bias sums belong to one head and need no atomics.

Why one op and not the separate norm and RoPE kernels: inside the compiled XL step Inductor
spends about 5.7 ms per step on this stage (the q/k norm backward with the RoPE, a copy that
stacks dq, dk, dv for the qkv weight gradient, the RoPE forward with the unbind), and 0.6 ms
more on the bias gradient; its bytes (12 B forward, 16 B backward per token and channel, bf16)
allow about 2.5 ms on an H100 (benchmarks/NOTES.md). The op boundary is the GEMM before it and
the attention after it, so keeping it opaque to Inductor costs no fusion.

Numerics: statistics and arithmetic in fp32, one rounding to qkv's dtype at the end. The
reference (:func:`sfd_train.kernels.reference.qk_norm_rope`) adds the bias inside the GEMM and
rounds the normalised value once more before the weight; the two agree within the dtype's
rounding. The statistics are recomputed in the backward from qkv (which the backward reads
anyway) rather than saved.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sfd_train.kernels.triton_rms_norm import (
    _direct, _target_programs, column_vector, or_empty, register_op, vector_alignment,
)

# Widest head the kernels take in registers (the family uses 64, 72 and 96).
MAX_HEAD_DIM = 256


@triton.jit
def _row_offsets(rows, tokens, heads, D, ALIGN: tl.constexpr):
    """Row ``(b, h, n)`` of the head-major tensors -> ``(n, its q offset in qkv, its offset in q)``.

    Every offset is a multiple of D, hence of ALIGN (checked by the launcher): 16-byte accesses.
    """
    n = rows % tokens
    h = (rows // tokens) % heads
    b = rows // (tokens * heads)
    src = tl.multiple_of((b.to(tl.int64) * tokens + n) * (3 * heads * D) + h * D, ALIGN)
    dst = tl.multiple_of(rows.to(tl.int64) * D, ALIGN)
    return n, src, dst


@triton.jit
def _head_rows(tokens, BLOCK_ROWS: tl.constexpr, TILE: tl.constexpr):
    """Program (bh, s) of a grid over (sample x head, runs of tokens): ``(bh, its first row, its last row + 1)``.

    Tile ``TILE`` of the run ``s`` of ``BLOCK_ROWS``-row tiles; every row of a program is of one head,
    so the head's bias slice is one vector per program.
    """
    head_rows = tl.program_id(0)
    first = head_rows * tokens + tl.program_id(1) * BLOCK_ROWS * TILE
    last = tl.minimum(first + BLOCK_ROWS * TILE, head_rows * tokens + tokens)
    return head_rows, first, last


@triton.jit
def _normed_rotated(X, W, src, cols, mask, col_mask, cos, sin, sign, D, eps, bias, bias_partner,
                    HAS_ROPE: tl.constexpr):
    """``rope(rms_norm(x + bias) * w)`` of a tile of rows of x (fp32)."""
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        # The pair partner (2j <-> 2j+1) comes from the same cache lines as x.
        partner = cols ^ 1
        x_partner = tl.load(X + src[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        x_partner += bias_partner[None, :]
        w_partner = tl.load(W + partner, mask=col_mask, other=0.0).to(tl.float32)
        y = y * cos + sign[None, :] * (x_partner * rstd[:, None] * w_partner[None, :]) * sin
    return y


@triton.jit
def _qk_norm_rope_fwd_kernel(
    QKV, BIAS, WQ, WK, COS, SIN, Q, K, V,
    heads, tokens, D, eps,
    HAS_ROPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Rows in the outputs' (b, h, n) order, so every store is one contiguous run; one head per program.
    head_rows, first, last = _head_rows(tokens, BLOCK_ROWS, 1)
    rows = first + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < last
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    n, src, dst = _row_offsets(rows, tokens, heads, D, ALIGN)
    width = heads * D  # one of q, k, v for one token
    head_at = (head_rows % heads) * D
    cos = 0.0
    sin = 0.0
    sign = 0.0
    if HAS_ROPE:
        table = n[:, None] * D + cols[None, :]
        cos = tl.load(COS + table, mask=mask, other=0.0)
        sin = tl.load(SIN + table, mask=mask, other=0.0)
        # rotate_pairs: slot 2j gets -x[2j+1], slot 2j+1 gets x[2j].
        sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    out = dst[:, None] + cols[None, :]
    partner = cols ^ 1
    q = _normed_rotated(QKV, WQ, src, cols, mask, col_mask, cos, sin, sign, D, eps,
                        column_vector(BIAS, head_at, cols, col_mask, HAS_BIAS, 0.0),
                        column_vector(BIAS, head_at, partner, col_mask, HAS_BIAS and HAS_ROPE, 0.0), HAS_ROPE)
    tl.store(Q + out, q.to(Q.dtype.element_ty), mask=mask)
    k = _normed_rotated(QKV, WK, src + width, cols, mask, col_mask, cos, sin, sign, D, eps,
                        column_vector(BIAS, width + head_at, cols, col_mask, HAS_BIAS, 0.0),
                        column_vector(BIAS, width + head_at, partner, col_mask, HAS_BIAS and HAS_ROPE, 0.0), HAS_ROPE)
    tl.store(K + out, k.to(K.dtype.element_ty), mask=mask)
    v = tl.load(QKV + (src + 2 * width)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    v += column_vector(BIAS, 2 * width + head_at, cols, col_mask, HAS_BIAS, 0.0)[None, :]
    tl.store(V + out, v.to(V.dtype.element_ty), mask=mask)


@triton.jit
def _normed_rotated_grad(DOUT, X, W, src, out, cols, mask, col_mask, cos, sin_partner, sign, D, eps, bias,
                         HAS_ROPE: tl.constexpr):
    """``(dx, dw summed over the tile's rows)`` for a tile of rows (fp32); ``bias`` is the program's head's."""
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    xhat = x * rstd[:, None]
    dy = tl.load(DOUT + out, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        # The rotation transposed: dy = dout * cos - sign * dout[partner] * sin[partner].
        partner = out - cols[None, :] + (cols ^ 1)[None, :]
        dout_partner = tl.load(DOUT + partner, mask=mask, other=0.0).to(tl.float32)
        dy = dy * cos - sign[None, :] * dout_partner * sin_partner
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.sum(dy * xhat, axis=0)
    g = dy * w[None, :]
    # d(x * rstd) / dx: rstd * (g - xhat * mean(g * xhat)).
    proj = tl.sum(g * xhat, axis=1) / D
    dx = (g - xhat * proj[:, None]) * rstd[:, None]
    return dx, dw


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQ, DK, DV, QKV, BIAS, WQ, WK, COS, SIN, DQKV, DWQ_PART, DWK_PART, DBIAS_PART,
    heads, tokens, D, eps,
    TILES_PER_PROGRAM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Program (bh, s) owns the s-th run of TILES_PER_PROGRAM tiles of (sample, head) bh's tokens, so the
    # bias slice it reads and sums is one head's.
    head_rows, first, last = _head_rows(tokens, BLOCK_ROWS, TILES_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    width = heads * D
    head_at = (head_rows % heads) * D
    bq = column_vector(BIAS, head_at, cols, col_mask, HAS_BIAS, 0.0)
    bk = column_vector(BIAS, width + head_at, cols, col_mask, HAS_BIAS, 0.0)
    dwq_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dwk_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbq_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbk_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbv_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime scalar.
    for tile in range(0, TILES_PER_PROGRAM):
        rows = first + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        n, src, dst = _row_offsets(rows, tokens, heads, D, ALIGN)
        out = dst[:, None] + cols[None, :]
        cos = 0.0
        sin_partner = 0.0
        sign = 0.0
        if HAS_ROPE:
            table = n[:, None] * D
            cos = tl.load(COS + table + cols[None, :], mask=mask, other=0.0)
            sin_partner = tl.load(SIN + table + (cols ^ 1)[None, :], mask=mask, other=0.0)
            sign = tl.where(cols % 2 == 0, -1.0, 1.0)
        grad_at = src[:, None] + cols[None, :]
        # Masked rows read dy = 0, so they add nothing to any sum.
        dq, dwq = _normed_rotated_grad(DQ, QKV, WQ, src, out, cols, mask, col_mask, cos, sin_partner, sign, D, eps,
                                       bq, HAS_ROPE)
        tl.store(DQKV + grad_at, dq.to(DQKV.dtype.element_ty), mask=mask)
        dwq_acc += dwq
        dk, dwk = _normed_rotated_grad(DK, QKV, WK, src + width, out, cols, mask, col_mask, cos, sin_partner, sign, D,
                                       eps, bk, HAS_ROPE)
        tl.store(DQKV + width + grad_at, dk.to(DQKV.dtype.element_ty), mask=mask)
        dwk_acc += dwk
        dv = tl.load(DV + out, mask=mask, other=0.0)
        tl.store(DQKV + 2 * width + grad_at, dv.to(DQKV.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbq_acc += tl.sum(dq, axis=0)
            dbk_acc += tl.sum(dk, axis=0)
            dbv_acc += tl.sum(dv.to(tl.float32), axis=0)
    program = head_rows * tl.num_programs(1) + tl.program_id(1)
    part = program.to(tl.int64) * D + cols
    tl.store(DWQ_PART + part, dwq_acc, mask=col_mask)
    tl.store(DWK_PART + part, dwk_acc, mask=col_mask)
    if HAS_BIAS:
        bias_part = program.to(tl.int64) * 3 * D + cols
        tl.store(DBIAS_PART + bias_part, dbq_acc, mask=col_mask)
        tl.store(DBIAS_PART + bias_part + D, dbk_acc, mask=col_mask)
        tl.store(DBIAS_PART + bias_part + 2 * D, dbv_acc, mask=col_mask)


# --------------------------------------------------------------------------- launchers


# (values per tensor per program, warps). Chosen from the sm_90 builds' register counts
# (tests/test_kernels_sm90.py compiles them here): both kernels hold about 14 fp32 values per lane
# and row live (a row of 72 takes 128 lanes), so registers, not the tile, bound the rows in flight.
# Two warps per program let more programs share a multiprocessor: about 20 KiB of loads in flight
# with triton 3.9 (14 with 3.6), against 11-13 KiB at four warps. A row split into power-of-two
# pieces (64 + 8) took more registers here, not fewer: the 8-lane piece is replicated across the
# warps. benchmarks/bench_kernels.py --qk-tiles times the alternatives on a GPU.
FWD_TILE = (1024, 2)
BWD_TILE = (512, 2)


def _tile(D: int, tile: Tuple[int, int]) -> Tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_ROWS, num_warps)`` for head dim D and a ``(values, warps)`` tile."""
    if D > MAX_HEAD_DIM or D % 2:
        raise ValueError(f"the fused q/k norm + RoPE takes even head dims up to {MAX_HEAD_DIM}, got {D}")
    values, num_warps = tile
    block_d = triton.next_power_of_2(D)
    rows = max(1, values // block_d)
    return block_d, 1 << (rows.bit_length() - 1), num_warps  # a power of two (tl.arange)


def _dims(qkv: torch.Tensor) -> Tuple[int, int, int, int]:
    batch, tokens, three, heads, D = qkv.shape
    return int(batch), int(tokens), int(heads), int(D)


def _fwd(qkv, bias, q_weight, k_weight, cos, sin, eps, launch=_direct):
    qkv = qkv.contiguous()
    batch, tokens, heads, D = _dims(qkv)
    block_d, block_rows, num_warps = _tile(D, FWD_TILE)
    shape = (batch, heads, tokens, D)
    q, k, v = (torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    launch(_qk_norm_rope_fwd_kernel)[(batch * heads, triton.cdiv(tokens, block_rows))](
        qkv, bias, q_weight, k_weight, cos, sin, q, k, v,
        heads, tokens, D, eps,
        HAS_ROPE=cos is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=vector_alignment(D, qkv.element_size()),
        num_warps=num_warps,
    )
    return q, k, v


def _bwd(dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, eps, launch=_direct):
    """``(d qkv, d bias, d q_weight, d k_weight)``; d bias is None without a bias."""
    qkv = qkv.contiguous()
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    batch, tokens, heads, D = _dims(qkv)
    block_d, block_rows, num_warps = _tile(D, BWD_TILE)
    head_rows = batch * heads
    # A few waves over the multiprocessors; each program sums its rows' weight and bias gradients.
    splits = max(1, min(triton.cdiv(tokens, block_rows), _target_programs(qkv.device) // head_rows))
    rows_per_program = triton.cdiv(triton.cdiv(tokens, splits), block_rows) * block_rows
    splits = triton.cdiv(tokens, rows_per_program)
    programs = head_rows * splits
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dwq_part = torch.empty((programs, D), dtype=torch.float32, device=qkv.device)
    dwk_part = torch.empty((programs, D), dtype=torch.float32, device=qkv.device)
    dbias_part = torch.empty((programs, 3, D), dtype=torch.float32, device=qkv.device) if bias is not None else None
    launch(_qk_norm_rope_bwd_kernel)[(head_rows, splits)](
        dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, dqkv, dwq_part, dwk_part, dbias_part,
        heads, tokens, D, eps,
        TILES_PER_PROGRAM=rows_per_program // block_rows,
        HAS_ROPE=cos is not None,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=vector_alignment(D, min(t.element_size() for t in (qkv, dq, dk, dv))),
        num_warps=num_warps,
    )
    dbias = None
    if bias is not None:  # (B, H, splits, 3, D) partial sums -> the bias's (3, H, D) layout
        dbias = dbias_part.view(batch, heads, splits, 3, D).sum((0, 2)).transpose(0, 1).reshape(bias.shape)
        dbias = dbias.to(bias.dtype)
    return dqkv, dbias, dwq_part.sum(0).to(q_weight.dtype), dwk_part.sum(0).to(k_weight.dtype)


# --------------------------------------------------------------------------- custom ops (torch.compile)


def _fwd_fake(qkv, bias, q_weight, k_weight, cos, sin, eps):
    batch, tokens, _, heads, D = qkv.shape
    return tuple(qkv.new_empty((batch, heads, tokens, D)) for _ in range(3))


@register_op("sfd_kernels::qk_norm_rope_fwd", _fwd_fake)
def qk_norm_rope_fwd_op(
    qkv: torch.Tensor,
    bias: Optional[torch.Tensor],
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    eps: float,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(q, k, v)``, each ``(B, H, N, D_h)``."""
    return _fwd(qkv, bias, q_weight, k_weight, cos, sin, eps, launch)


def _bwd_fake(dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, eps):
    return (qkv.new_empty(qkv.shape), bias.new_empty(bias.shape) if bias is not None else qkv.new_empty(0),
            q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape))


@register_op("sfd_kernels::qk_norm_rope_bwd", _bwd_fake)
def qk_norm_rope_bwd_op(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    qkv: torch.Tensor,
    bias: Optional[torch.Tensor],
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    eps: float,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(d qkv, d bias, d q_weight, d k_weight)``; d bias is empty without a bias."""
    dqkv, dbias, dwq, dwk = _bwd(dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, eps, launch)
    return or_empty(qkv, (dqkv, dbias, dwq, dwk))


def _head_grads(qkv, dq, dk, dv):
    """dq, dk, dv with a zero tensor for any output that did not reach the loss (autograd passes None)."""
    batch, tokens, heads, D = _dims(qkv)
    return [qkv.new_zeros((batch, heads, tokens, D)) if g is None else g for g in (dq, dk, dv)]


def _setup_context(ctx, inputs, output):
    qkv, bias, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, bias, q_weight, k_weight, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq, dk, dv):
    qkv, bias, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dv = _head_grads(qkv, dq, dk, dv)
    dqkv, dbias, dwq, dwk = torch.ops.sfd_kernels.qk_norm_rope_bwd(dq, dk, dv, qkv, bias, q_weight, k_weight, cos,
                                                                   sin, ctx.eps)
    return dqkv, dbias if bias is not None else None, dwq, dwk, None, None, None


qk_norm_rope_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager path


class _QKNormRopeFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, qkv, bias, q_weight, k_weight, cos, sin, eps):
        ctx.save_for_backward(qkv, bias, q_weight, k_weight, cos, sin)
        ctx.eps = eps
        return _fwd(qkv, bias, q_weight, k_weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, bias, q_weight, k_weight, cos, sin = ctx.saved_tensors
        dq, dk, dv = _head_grads(qkv, dq, dk, dv)
        grads = _bwd(dq, dk, dv, qkv, bias, q_weight, k_weight, cos, sin, ctx.eps)
        return (*(g if wanted else None for g, wanted in zip(grads, ctx.needs_input_grad)), None, None, None)


# --------------------------------------------------------------------------- public ops


def qk_norm_rope_heads(
    qkv: torch.Tensor,
    bias: Optional[torch.Tensor],
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]],
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernels on the qkv GEMM's output: its bias, q/k RMSNorm, RoPE and the split into heads.

    Args:
        qkv: ``(B, N, 3, H, D_h)``, the qkv GEMM's output without its bias (fp32/bf16/fp16), D_h even.
        bias: ``(3 * H * D_h,)``, the qkv Linear's bias, or None.
        q_weight, k_weight: ``(D_h,)`` RMSNorm weights of q and k.
        rope: ``(cos, sin)`` tables ``(N, D_h)`` (fixed buffers: they get no gradient), or None.
        eps: added to the mean square.

    Returns:
        ``(q, k, v)``, each a contiguous ``(B, H, N, D_h)`` tensor of qkv's dtype.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"expected qkv of shape (B, N, 3, H, D_h), got {tuple(qkv.shape)}")
    D, tokens = qkv.shape[-1], qkv.shape[1]
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q/k norm weights must be ({D},), got {tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    if bias is not None and bias.shape != (3 * qkv.shape[3] * D,):
        raise ValueError(f"expected a qkv bias of shape ({3 * qkv.shape[3] * D},), got {tuple(bias.shape)}")
    cos = sin = None
    if rope is not None:
        cos, sin = rope
        if cos.shape != (tokens, D) or sin.shape != cos.shape:
            raise ValueError(f"expected RoPE tables ({tokens}, {D}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("the fused q/k norm + RoPE gives no gradient to the tables; "
                             "use qk_norm_rope: separate for trainable ones")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    _tile(int(D), FWD_TILE)  # the head dim check, before anything is traced
    qkv = qkv.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.sfd_kernels.qk_norm_rope_fwd(qkv, bias, q_weight, k_weight, cos, sin, eps)
    return _QKNormRopeFunction.apply(qkv, bias, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    heads: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]],
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's input stage (same contract as :func:`sfd_train.kernels.reference.qk_norm_rope`).

    The qkv GEMM runs without its bias; the fused kernel adds it, and its backward returns the
    bias gradient from the same pass.
    """
    qkv = F.linear(x, qkv_weight).unflatten(-1, (3, heads, -1))
    return qk_norm_rope_heads(qkv, qkv_bias, q_weight, k_weight, rope, eps)
