"""Building blocks of LightningDiT. Plain modules: no parallelism, no compile, no checkpointing.

Every op with a fast path (RMSNorm, norm + adaLN modulation, attention, RoPE) is called
through the :class:`~sfd_train.kernels.KernelOps` the model was built with.
"""

from __future__ import annotations

import torch
from torch import nn

from sfd_train.kernels import KernelOps
from sfd_train.kernels.reference import add_gated, modulate


class RMSNorm(nn.Module):
    """RMSNorm with a weight, computed in float32 (eps 1e-6)."""

    def __init__(self, dim: int, ops: KernelOps, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._norm = ops.rms_norm
        self._norm_modulate = ops.rms_norm_modulate
        self._add_norm_modulate = ops.add_rms_norm_modulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        """``modulate(norm(x), shift, scale)``, fused where the kernels allow."""
        return self._norm_modulate(x, self.weight, shift, scale, self.eps)

    def add_modulated(
        self, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor | None,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the gated residual, then normalises: ``(x_new, modulate(norm(x_new)))`` with
        ``x_new = x + gate * branch``, fused where the kernels allow (``kernels.add_rms_norm``)."""
        return self._add_norm_modulate(x, branch, gate, self.weight, shift, scale, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class PlainLayerNorm(nn.LayerNorm):
    """LayerNorm without affine parameters (LightningDiT with ``use_rmsnorm=False``)."""

    def __init__(self, dim: int):
        super().__init__(dim, elementwise_affine=False, eps=1e-6)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        return modulate(self(x), shift, scale)

    def add_modulated(
        self, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor | None,
        scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = add_gated(x, branch, gate)
        return x, self.modulated(x, shift, scale)


def make_norm(dim: int, use_rmsnorm: bool, ops: KernelOps) -> nn.Module:
    return RMSNorm(dim, ops) if use_rmsnorm else PlainLayerNorm(dim)


def make_head_norm(head_dim: int, use_qknorm: bool, use_rmsnorm: bool, ops: KernelOps) -> nn.Module:
    """The q/k norm over the head dimension (LayerNorm with affine when RMSNorm is off)."""
    if not use_qknorm:
        return nn.Identity()
    return RMSNorm(head_dim, ops) if use_rmsnorm else nn.LayerNorm(head_dim)


class Attention(nn.Module):
    """Multi-head self-attention with q/k norm and optional 2-D RoPE (applied after the norm)."""

    def __init__(self, dim: int, num_heads: int, use_qknorm: bool, use_rmsnorm: bool, ops: KernelOps):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = make_head_norm(self.head_dim, use_qknorm, use_rmsnorm, ops)
        self.k_norm = make_head_norm(self.head_dim, use_qknorm, use_rmsnorm, ops)
        self.proj = nn.Linear(dim, dim, bias=True)
        self._attention = ops.attention
        self._apply_rope = ops.apply_rope
        # RMSNorm q/k norms (the published models): the input stage is one op, which may be fused.
        self._qk_norm_rope = ops.qk_norm_rope if isinstance(self.q_norm, RMSNorm) else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        # The heads follow from the weight, so a module holding a slice of them computes that slice.
        heads = self.qkv.weight.shape[0] // (3 * self.head_dim)
        if self._qk_norm_rope is not None:
            # The op applies the qkv Linear itself, so that a fused kernel can take its bias.
            q, k, v = self._qk_norm_rope(x, self.qkv.weight, self.qkv.bias, heads, self.q_norm.weight,
                                         self.k_norm.weight, rope, self.q_norm.eps)
        else:  # LayerNorm or no q/k norm
            qkv = self.qkv(x).reshape(batch, tokens, 3, heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                # The tables are fp32 buffers; bring q/k back to v's dtype (what autocast would do).
                q = self._apply_rope(q, *rope).to(v.dtype)
                k = self._apply_rope(k, *rope).to(v.dtype)
        out = self._attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim))


class SwiGLU(nn.Module):
    """``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)``.

    The w12 Linear is applied by ``ops.swiglu`` (with its weight and bias), so that a fused gate
    can take the bias into its own kernel and return the bias gradient from its backward.
    """

    def __init__(self, dim: int, hidden: int, ops: KernelOps):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=True)
        self.w3 = nn.Linear(hidden, dim, bias=True)
        self._gate = ops.swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self._gate(x, self.w12.weight, self.w12.bias))


class GeluMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (LightningDiT with ``use_swiglu=False``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A LightningDiT block with adaLN-Zero modulation: the residual stream in, the stream out.

    ``x += gate_msa * attn(modulate(norm1(x)))``; ``x += gate_mlp * mlp(modulate(norm2(x)))``.
    The attention's residual add and ``norm2`` are one op (``norm2.add_modulated``), which
    ``kernels.add_rms_norm`` may fuse; everything else is the plain expression.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        use_qknorm: bool,
        use_swiglu: bool,
        use_rmsnorm: bool,
        wo_shift: bool,
        ops: KernelOps,
    ):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = make_norm(dim, use_rmsnorm, ops)
        self.attn = Attention(dim, num_heads, use_qknorm, use_rmsnorm, ops)
        self.norm2 = make_norm(dim, use_rmsnorm, ops)
        if use_swiglu:
            self.mlp: nn.Module = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim), ops)
        else:
            self.mlp = GeluMLP(dim, int(mlp_ratio * dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """
        Args:
            x: ``(B, N, D)``, the residual stream.
            c: ``(B, D)``, the conditioning.
            rope: the RoPE tables, or None.

        Returns:
            ``(B, N, D)``: the stream after this block.
        """
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = self.norm1.modulated(x, shift_msa, scale_msa)
        x, h = self.norm2.add_modulated(x, self.attn(h, rope), gate_msa, shift_mlp, scale_mlp)
        return add_gated(x, self.mlp(h), gate_mlp)


class FinalLayer(nn.Module):
    """``linear(modulate(norm_final(x), shift, scale))`` -> ``p*p*C`` values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, use_rmsnorm: bool, ops: KernelOps):
        super().__init__()
        self.norm_final = make_norm(dim, use_rmsnorm, ops)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final.modulated(x, shift, scale))


def repa_projector(dim: int, projector_dim: int, feature_dim: int) -> nn.Sequential:
    """REPA's MLP: ``Linear(d, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, feature_dim)``."""
    return nn.Sequential(
        nn.Linear(dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, feature_dim),
    )
