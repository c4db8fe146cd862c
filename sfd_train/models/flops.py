"""Multiply-add counts of the model, for throughput and MFU.

Convention (DESIGN.md §4): FLOPs = 2 x multiply-adds; a training step costs 3 x the
forward (activation recomputation not counted).
"""

from __future__ import annotations

from sfd_train.config.schema import ModelConfig


def forward_macs_per_image(config: ModelConfig, with_repa: bool = True) -> int:
    """Multiply-adds of one forward pass for one image (matmuls and attention).

    XL/1 at 256 tokens: 118.6 G in the body, 120.7 G with the REPA projector.
    """
    depth, d, _ = config.dims()
    p, c = config.patch_size, config.in_channels
    n = (config.input_size // p) ** 2
    hidden = int(2 / 3 * config.mlp_ratio * d) if config.use_swiglu else int(config.mlp_ratio * d)
    mlp = n * d * (2 * hidden if config.use_swiglu else hidden) + n * hidden * d
    attention = n * d * 3 * d + 2 * n * n * d + n * d * d
    adaln = d * (4 if config.wo_shift else 6) * d
    body = depth * (attention + mlp + adaln)
    embed = n * c * p * p * d + 2 * (256 * d // 2 + (d // 2) ** 2)
    final = d * 2 * d + n * d * p * p * c
    macs = body + embed + final
    if with_repa and config.use_repa:
        proj = config.repa_projector_dim
        macs += n * (d * proj + proj * proj + proj * config.repa_feature_dim)
    return macs


def training_flops_per_image(config: ModelConfig, with_repa: bool = True) -> float:
    """FLOPs of one training step per image: 3 x forward, 2 FLOPs per multiply-add."""
    return 3 * 2 * forward_macs_per_image(config, with_repa)
