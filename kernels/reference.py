"""Pure-PyTorch reference implementations. They define the numerics every fast path
must reproduce (DESIGN.md §7) and serve on any device.

Shapes: hidden states ``(..., D)``; attention inputs ``(B, H, N, D_h)``; RoPE tables
``(N, D_h)``; adaLN vectors ``(B, D)`` broadcast over tokens of ``x`` ``(B, N, D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps)`` computed in float32, cast back to x's dtype, times ``weight``."""
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y * weight if weight is not None else y


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample vectors broadcast over tokens."""
    out = x * (1 + scale.unsqueeze(1))
    return out + shift.unsqueeze(1) if shift is not None else out


def rms_norm_modulate(
    x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``modulate(rms_norm(x, weight), shift, scale)``: the pre-norm of every DiT block."""
    return modulate(rms_norm(x, weight, eps), shift, scale)


def add_gated(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The adaLN-Zero residual ``x + gate * branch`` with a per-sample gate ``(B, D)`` broadcast over tokens."""
    return x + gate.unsqueeze(1) * branch


def add_rms_norm_modulate(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    norm_modulate=rms_norm_modulate,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated residual, then the norm that reads the stream next: ``(x_new, norm_modulate(x_new))``.

    In the model: the attention's output added inside a block, then ``norm2``.

    Args:
        x: ``(B, N, D)``, the residual stream.
        branch: ``(B, N, D)``, the attention's or the MLP's output, not yet added.
        gate: ``(B, D)``, its adaLN gate.
        weight, shift, scale, eps: the next norm's weight and modulation, as in :func:`rms_norm_modulate`.
        norm_modulate: the norm + modulation op to compose (the dispatch passes the one it chose).

    Returns:
        ``(x_new, y)`` with ``x_new = x + gate * branch`` and ``y`` the modulated norm of x_new.
    """
    x = add_gated(x, branch, gate)
    return x, norm_modulate(x, weight, shift, scale, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(D_h)``, computed in float32; ``(B, H, N, D_h)`` in and out."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Maps each adjacent pair ``(x0, x1)`` of the last dimension to ``(-x1, x0)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x * cos + rotate_pairs(x) * sin`` with tables of shape ``(N, D_h)``."""
    return x * cos + rotate_pairs(x) * sin


def qk_norm_rope(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    heads: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float = 1e-6,
    *,
    norm=rms_norm,
    rotate=apply_rope,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention's input stage: the qkv Linear, the split into heads, RMSNorm of q and k over
    the head dim, then RoPE.

    Args:
        x: ``(B, N, D)``, the attention's input.
        qkv_weight, qkv_bias: the qkv Linear's ``(3 * D, D)`` weight and ``(3 * D,)`` bias (or None).
        heads: the number of heads H (``D_h = D / H``).
        q_weight, k_weight: ``(D_h,)`` RMSNorm weights of q and k.
        rope: ``(cos, sin)`` tables ``(N, D_h)``, or None for no rotary embedding.
        eps: added to the mean square.
        norm, rotate: the RMSNorm and RoPE ops to compose (the dispatch passes the ones it chose).

    Returns:
        ``(q, k, v)``, each ``(B, H, N, D_h)``; v is a view of the Linear's output. With RoPE, q and
        k are cast back to v's dtype (the tables are fp32 buffers; this is what autocast would do).
    """
    qkv = F.linear(x, qkv_weight, qkv_bias).unflatten(-1, (3, heads, -1))
    return qk_norm_rope_heads(qkv, q_weight, k_weight, rope, eps, norm=norm, rotate=rotate)


def qk_norm_rope_heads(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float = 1e-6,
    *,
    norm=rms_norm,
    rotate=apply_rope,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope` after the Linear, from its output ``qkv`` viewed as ``(B, N, 3, H, D_h)``."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = norm(q, q_weight, eps), norm(k, k_weight, eps)
    if rope is not None:
        q = rotate(q, *rope).to(v.dtype)
        k = rotate(k, *rope).to(v.dtype)
    return q, k, v


def swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU's input stage: the w12 Linear, then ``silu(x1) * x2`` with ``x1, x2`` its output's halves.

    Args:
        x: ``(..., D)``, the MLP's input.
        weight, bias: the w12 Linear's ``(2 * hidden, D)`` weight and ``(2 * hidden,)`` bias (or None).

    Returns:
        ``(..., hidden)``, the w3 Linear's input.
    """
    x1, x2 = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(x1) * x2


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (LightningDiT's norm when RMSNorm is off)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)
