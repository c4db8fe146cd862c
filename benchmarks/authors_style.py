"""The SFD authors' LightningDiT training step, re-implemented compactly as the baseline.

Written from the published description of their code (not copied): the habits that set
its speed are kept, namely
- fp32 parameters under ``torch.autocast(bfloat16)``;
- RMSNorm as in fairscale/LLaMA: ``x.float()`` -> normalise -> ``type_as(x)`` -> ``* weight``;
- q/k RMSNorm over the head dim, 2-D RoPE as ``t * cos + rotate_half(t) * sin`` with fp32
  tables, attention with ``F.scaled_dot_product_attention``;
- SwiGLU MLP, adaLN-Zero modulation ``x * (1 + scale) + shift`` as separate ops;
- every block wrapped in ``torch.compile``;
- label dropout inside the label embedder, the loss in a separate transport function;
- ``torch.optim.AdamW`` with its defaults (the foreach implementation on CUDA).

The model computes the same function as ``sfd_train.models`` (same sizes and FLOPs), so
the two step times compare like for like.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


def rotate_half(x):
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE: the first half of a head's angles from the row, the second from the column."""

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float()[: half // 2] / half)
        pos = torch.arange(grid).float()
        axis = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=-1)
        angles = torch.cat([axis[:, None].expand(grid, grid, half), axis[None].expand(grid, grid, half)], dim=-1)
        angles = angles.reshape(grid * grid, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, t):
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLUFFN(dim, int(2 / 3 * int(dim * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device).float() / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SFDLightningDiT(nn.Module):
    """Dual-timestep LightningDiT with a REPA projector (patch size 1 or 2)."""

    def __init__(self, input_size=16, patch_size=1, in_channels=48, hidden=1152, depth=28, heads=16,
                 num_classes=1000, class_dropout=0.1, repa_depth=2, projector_dim=2048, z_dim=768,
                 compile_blocks=True):
        super().__init__()
        self.p, self.c, self.grid = patch_size, in_channels, input_size // patch_size
        self.repa_depth = repa_depth
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, patch_size)
        self.t_embedder_sem = TimestepEmbedder(hidden // 2)
        self.t_embedder_tex = TimestepEmbedder(hidden - hidden // 2)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid**2, hidden) * 0.02, requires_grad=False)
        self.feat_rope = VisionRotaryEmbedding(hidden // heads, self.grid)
        self.blocks = nn.ModuleList(LightningDiTBlock(hidden, heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch_size * patch_size * in_channels)
        self.repa_projector = nn.Sequential(
            nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
        if compile_blocks:
            for block in self.blocks:
                block.compile()

    def unpatchify(self, x):
        g, p, c = self.grid, self.p, self.c
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t_tex, t_sem, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = torch.cat([self.t_embedder_sem(t_sem), self.t_embedder_tex(t_tex)], dim=1) + self.y_embedder(y)
        zs = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c, self.feat_rope)
            if i == self.repa_depth:
                zs = self.repa_projector(x)
        return self.unpatchify(self.final_layer(x, c)), zs


def sfd_transport_loss(model, x1, y, dino, semantic_channels=16, delta_t=0.3, semantic_weight=2.0):
    """Asynchronous flow matching loss: weighted MSE + velocity cosine + REPA cosine."""
    batch, channels = x1.shape[:2]
    tau = torch.sigmoid(torch.randn(batch, device=x1.device))
    s = tau * (1 + delta_t)
    t_sem, t_tex = s.clamp(max=1.0), (s - delta_t).clamp(min=0.0)
    t = torch.cat([t_tex[:, None].expand(batch, channels - semantic_channels),
                   t_sem[:, None].expand(batch, semantic_channels)], dim=1)[:, :, None, None]
    x0 = torch.randn_like(x1)
    xt = t * x1 + (1 - t) * x0
    target = x1 - x0
    pred, zs = model(xt, t_tex, t_sem, y)
    pred = pred.float()
    weights = torch.ones(channels, device=x1.device)
    weights[channels - semantic_channels:] = semantic_weight
    mse = ((pred - target) ** 2 * weights[None, :, None, None]).mean()
    cos = (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    repa = (1 - F.cosine_similarity(zs.float(), dino.flatten(2).transpose(1, 2).float(), dim=-1)).mean()
    return mse + cos + repa
