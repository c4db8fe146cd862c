"""Input embeddings of LightningDiT: patches, positions, timesteps, labels, RoPE tables.

The conventions here decide whether the published checkpoints reproduce their
outputs (DESIGN.md §7); each function states its convention.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens of width ``d`` (a strided conv), row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# The fixed tables below are computed on the CPU whatever the default device, so that a model
# defined on the meta device can record them (and every device gets the same values).
CPU = torch.device("cpu")


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p w_k), cos(p w_k)]`` with ``w_k = 1 / 10000^(k / (dim/2))``, k < dim/2; float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=CPU) / (dim / 2.0))
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_table(dim: int, grid_size: int) -> torch.Tensor:
    """The MAE/DiT 2-D sin-cos position table, ``(grid_size**2, dim)`` in float64.

    Tokens are row-major. The first half of the channels encodes the column index,
    the second half the row index.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64, device=CPU), torch.arange(grid_size, dtype=torch.float64, device=CPU),
        indexing="ij",
    )
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def rope_2d_tables(head_dim: int, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(grid_size**2, head_dim)`` of the 2-D rotary embedding.

    Each axis gets ``a = head_dim / 2`` angles: frequencies ``1 / 10000^(2j / a)``
    (j < a/2) times the integer position, each repeated in two adjacent slots. A token's
    first ``a`` angles come from its row, the last ``a`` from its column.
    """
    axis_dim = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=CPU)[: axis_dim // 2] / axis_dim)
    positions = torch.arange(grid_size, dtype=torch.float32, device=CPU)
    per_axis = torch.repeat_interleave(positions[:, None] * freqs[None, :], 2, dim=-1)  # (G, a)
    row_part = per_axis[:, None, :].expand(grid_size, grid_size, axis_dim)
    col_part = per_axis[None, :, :].expand(grid_size, grid_size, axis_dim)
    angles = torch.cat([row_part, col_part], dim=-1).reshape(grid_size * grid_size, head_dim)
    return angles.cos(), angles.sin()


class RotaryTables(nn.Module):
    """Holds the RoPE tables as persistent buffers ``freqs_cos`` / ``freqs_sin`` (published names)."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        self.head_dim, self.grid_size = head_dim, grid_size
        self.register_buffer("freqs_cos", torch.empty(grid_size * grid_size, head_dim))
        self.register_buffer("freqs_sin", torch.empty(grid_size * grid_size, head_dim))
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        cos, sin = rope_2d_tables(self.head_dim, self.grid_size)
        self.freqs_cos.copy_(cos)
        self.freqs_sin.copy_(sin)


class TimestepEmbedder(nn.Module):
    """Scalar time in [0, 1] -> vector: 256 sinusoidal features, then Linear -> SiLU -> Linear.

    Time is used as is (not scaled by 1000). Features are ``[cos(t f_i), sin(t f_i)]``
    with ``f_i = exp(-ln(10000) i / 128)``.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def frequency_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
        return features

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.frequency_features(t, self.frequency_size)
        # Cast to the weights' dtype: under FSDP2 mixed precision they may be bf16.
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. The table has ``num_classes + 1`` rows; the last is the null class.

    Label dropout for guidance is applied by the objective (it replaces labels by
    ``num_classes``), so the forward pass is the same in training and evaluation.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)
