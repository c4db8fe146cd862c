"""The attention's input stage in one kernel each way (Triton): q/k RMSNorm, RoPE and the head layout.

Forward, from the ``qkv`` Linear's output viewed as ``(B, N, 3, H, D_h)``::

    q = rope(rms_norm(qkv[:, :, 0]) * q_weight)      -> (B, H, N, D_h), contiguous
    k = rope(rms_norm(qkv[:, :, 1]) * k_weight)      -> (B, H, N, D_h), contiguous
    v = qkv[:, :, 2]                                  -> (B, H, N, D_h), contiguous

Backward, from SDPA's ``dq, dk, dv``: one pass writes ``d(qkv)`` straight in the Linear's
``(B, N, 3, H, D_h)`` layout, with the RoPE transpose and the RMSNorm backward applied to the
q and k slots, and per-program partial sums of ``d(q_weight)`` and ``d(k_weight)``.

Why one op and not the separate norm and RoPE kernels: inside the compiled XL step Inductor
spends about 5.7 ms per step on this stage (the q/k norm backward with the RoPE, a copy that
stacks dq, dk, dv for the qkv weight gradient, the RoPE forward with the unbind); its bytes
(12 B forward, 16 B backward per token and channel, bf16) allow about 2.5 ms on an H100
(benchmarks/NOTES.md). The op boundary is the GEMM before it and the attention after it,
so keeping it opaque to Inductor costs no fusion.

Numerics: statistics and arithmetic in fp32, one rounding to qkv's dtype at the end. The
reference (:func:`sfd_train.kernels.reference.qk_norm_rope`) rounds the normalised value
once more before the weight; the two agree within the dtype's rounding. The statistics are
recomputed in the backward from qkv (which the backward reads anyway) rather than saved.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from sfd_train.kernels.triton_rms_norm import _direct, _target_programs, register_op, vector_alignment

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
def _normed_rotated(X, W, src, cols, mask, col_mask, cos, sin, sign, D, eps, HAS_ROPE: tl.constexpr):
    """``rope(rms_norm(x) * w)`` of a tile of rows of x (fp32)."""
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        # The pair partner (2j <-> 2j+1) comes from the same cache lines as x.
        partner = cols ^ 1
        x_partner = tl.load(X + src[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        w_partner = tl.load(W + partner, mask=col_mask, other=0.0).to(tl.float32)
        y = y * cos + sign[None, :] * (x_partner * rstd[:, None] * w_partner[None, :]) * sin
    return y


@triton.jit
def _qk_norm_rope_fwd_kernel(
    QKV, WQ, WK, COS, SIN, Q, K, V,
    n_rows, heads, tokens, D, eps,
    HAS_ROPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Rows in the outputs' (b, h, n) order, so every store is one contiguous run.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    n, src, dst = _row_offsets(rows, tokens, heads, D, ALIGN)
    width = heads * D  # one of q, k, v for one token
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
    q = _normed_rotated(QKV, WQ, src, cols, mask, col_mask, cos, sin, sign, D, eps, HAS_ROPE)
    tl.store(Q + out, q.to(Q.dtype.element_ty), mask=mask)
    k = _normed_rotated(QKV, WK, src + width, cols, mask, col_mask, cos, sin, sign, D, eps, HAS_ROPE)
    tl.store(K + out, k.to(K.dtype.element_ty), mask=mask)
    v = tl.load(QKV + (src + 2 * width)[:, None] + cols[None, :], mask=mask, other=0.0)
    tl.store(V + out, v, mask=mask)


@triton.jit
def _normed_rotated_grad(DOUT, X, W, src, out, cols, mask, col_mask, cos, sin_partner, sign, D, eps,
                         HAS_ROPE: tl.constexpr):
    """``(dx, dw summed over the tile's rows)`` for a tile of rows (fp32)."""
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
    DQ, DK, DV, QKV, WQ, WK, COS, SIN, DQKV, DWQ_PART, DWK_PART,
    n_rows, heads, tokens, D, eps, rows_per_program,
    TILES_PER_PROGRAM: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    width = heads * D
    first = tl.program_id(0) * rows_per_program
    dwq_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dwk_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime scalar.
    for tile in range(0, TILES_PER_PROGRAM):
        rows = first + tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
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
        dq, dwq = _normed_rotated_grad(DQ, QKV, WQ, src, out, cols, mask, col_mask, cos, sin_partner, sign, D, eps,
                                       HAS_ROPE)
        tl.store(DQKV + grad_at, dq.to(DQKV.dtype.element_ty), mask=mask)
        dwq_acc += dwq
        dk, dwk = _normed_rotated_grad(DK, QKV, WK, src + width, out, cols, mask, col_mask, cos, sin_partner, sign, D,
                                       eps, HAS_ROPE)
        tl.store(DQKV + width + grad_at, dk.to(DQKV.dtype.element_ty), mask=mask)
        dwk_acc += dwk
        dv = tl.load(DV + out, mask=mask, other=0.0)
        tl.store(DQKV + 2 * width + grad_at, dv.to(DQKV.dtype.element_ty), mask=mask)
    part = tl.program_id(0).to(tl.int64) * D + cols
    tl.store(DWQ_PART + part, dwq_acc, mask=col_mask)
    tl.store(DWK_PART + part, dwk_acc, mask=col_mask)


# --------------------------------------------------------------------------- launchers


# (values per tensor per program, warps). Chosen from the sm_90 builds' register counts
# (tests/test_kernels_sm90.py compiles them here): the forward at 1024/4 takes 16-byte accesses
# in about 110 registers; the backward holds about twice the tensors live, and at 512/4 stays
# near 95 registers with no spills, where 2048/4 spilled. benchmarks/bench_kernels.py --qk-tiles
# times the alternatives on a GPU.
FWD_TILE = (1024, 4)
BWD_TILE = (512, 4)


def _tile(D: int, tile: Tuple[int, int]) -> Tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_ROWS, num_warps)`` for head dim D and a ``(values, warps)`` tile."""
    if D > MAX_HEAD_DIM or D % 2:
        raise ValueError(f"the fused q/k norm + RoPE takes even head dims up to {MAX_HEAD_DIM}, got {D}")
    values, num_warps = tile
    block_d = triton.next_power_of_2(D)
    return block_d, max(1, values // block_d), num_warps


def _dims(qkv: torch.Tensor) -> Tuple[int, int, int, int]:
    batch, tokens, three, heads, D = qkv.shape
    return int(batch), int(tokens), int(heads), int(D)


def _fwd(qkv, q_weight, k_weight, cos, sin, eps, launch=_direct):
    qkv = qkv.contiguous()
    batch, tokens, heads, D = _dims(qkv)
    block_d, block_rows, num_warps = _tile(D, FWD_TILE)
    shape = (batch, heads, tokens, D)
    q, k, v = (torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    rows = batch * heads * tokens
    launch(_qk_norm_rope_fwd_kernel)[(triton.cdiv(rows, block_rows),)](
        qkv, q_weight, k_weight, cos, sin, q, k, v,
        rows, heads, tokens, D, eps,
        HAS_ROPE=cos is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=vector_alignment(D, qkv.element_size()),
        num_warps=num_warps,
    )
    return q, k, v


def _bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, eps, launch=_direct):
    qkv = qkv.contiguous()
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    batch, tokens, heads, D = _dims(qkv)
    block_d, block_rows, num_warps = _tile(D, BWD_TILE)
    rows = batch * heads * tokens
    # A few waves over the multiprocessors; each program sums its rows' weight gradients.
    programs = max(1, min(_target_programs(qkv.device), triton.cdiv(rows, block_rows)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_rows) * block_rows
    programs = triton.cdiv(rows, rows_per_program)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dwq_part = torch.empty((programs, D), dtype=torch.float32, device=qkv.device)
    dwk_part = torch.empty((programs, D), dtype=torch.float32, device=qkv.device)
    launch(_qk_norm_rope_bwd_kernel)[(programs,)](
        dq, dk, dv, qkv, q_weight, k_weight, cos, sin, dqkv, dwq_part, dwk_part,
        rows, heads, tokens, D, eps, rows_per_program,
        TILES_PER_PROGRAM=rows_per_program // block_rows,
        HAS_ROPE=cos is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_D=block_d,
        ALIGN=vector_alignment(D, min(t.element_size() for t in (qkv, dq, dk, dv))),
        num_warps=num_warps,
    )
    return dqkv, dwq_part.sum(0).to(q_weight.dtype), dwk_part.sum(0).to(k_weight.dtype)


# --------------------------------------------------------------------------- custom ops (torch.compile)


def _fwd_fake(qkv, q_weight, k_weight, cos, sin, eps):
    batch, tokens, _, heads, D = qkv.shape
    return tuple(qkv.new_empty((batch, heads, tokens, D)) for _ in range(3))


@register_op("sfd_kernels::qk_norm_rope_fwd", _fwd_fake)
def qk_norm_rope_fwd_op(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    eps: float,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: ``(q, k, v)``, each ``(B, H, N, D_h)``."""
    return _fwd(qkv, q_weight, k_weight, cos, sin, eps, launch)


def _bwd_fake(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, eps):
    return qkv.new_empty(qkv.shape), q_weight.new_empty(q_weight.shape), k_weight.new_empty(k_weight.shape)


@register_op("sfd_kernels::qk_norm_rope_bwd", _bwd_fake)
def qk_norm_rope_bwd_op(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    eps: float,
    launch=_direct,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(d qkv, d q_weight, d k_weight)``."""
    return _bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, eps, launch)


def _head_grads(qkv, dq, dk, dv):
    """dq, dk, dv with a zero tensor for any output that did not reach the loss (autograd passes None)."""
    batch, tokens, heads, D = _dims(qkv)
    return [qkv.new_zeros((batch, heads, tokens, D)) if g is None else g for g in (dq, dk, dv)]


def _setup_context(ctx, inputs, output):
    qkv, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq, dk, dv = _head_grads(qkv, dq, dk, dv)
    dqkv, dwq, dwk = torch.ops.sfd_kernels.qk_norm_rope_bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, ctx.eps)
    return dqkv, dwq, dwk, None, None, None


qk_norm_rope_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager path


class _QKNormRopeFunction(torch.autograd.Function):
    """The same kernels launched directly, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, qkv, q_weight, k_weight, cos, sin, eps):
        ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin)
        ctx.eps = eps
        return _fwd(qkv, q_weight, k_weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        qkv, q_weight, k_weight, cos, sin = ctx.saved_tensors
        dq, dk, dv = _head_grads(qkv, dq, dk, dv)
        dqkv, dwq, dwk = _bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, ctx.eps)
        return (
            dqkv if ctx.needs_input_grad[0] else None,
            dwq if ctx.needs_input_grad[1] else None,
            dwk if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- public op


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]],
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k RMSNorm, RoPE and the split into heads, fused (same contract as the reference op).

    Args:
        qkv: ``(B, N, 3, H, D_h)``, the qkv Linear's output (fp32/bf16/fp16), D_h even.
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
        return torch.ops.sfd_kernels.qk_norm_rope_fwd(qkv, q_weight, k_weight, cos, sin, eps)
    return _QKNormRopeFunction.apply(qkv, q_weight, k_weight, cos, sin, eps)
