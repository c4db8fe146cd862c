"""Time conventions of linear flow matching with a semantic-first offset.

``t = 0`` is noise and ``t = 1`` is data: ``x_t = t x_data + (1 - t) eps``, velocity
``u = x_data - eps``. A global time ``s`` in ``[0, 1 + dt]`` gives each part its own
time: ``t_sem = min(s, 1)`` runs ahead, ``t_tex = max(s - dt, 0)`` follows.
"""

from __future__ import annotations

import torch


def sample_global_time(
    batch: int,
    distribution: str,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draws ``tau`` in (0, 1) per sample: ``sigmoid(N(mean, std))`` or uniform."""
    if distribution == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(normal)
    if distribution == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    raise ValueError(f"unknown time distribution {distribution!r}; choose 'logit_normal' or 'uniform'")


def part_times(s: torch.Tensor, delta_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_tex, t_sem)`` for global time ``s`` in ``[0, 1 + dt]``."""
    return (s - delta_t).clamp(min=0.0), s.clamp(max=1.0)


def training_times(tau: torch.Tensor, delta_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_tex, t_sem)`` for ``tau`` in [0, 1]: ``s = tau (1 + dt)``."""
    return part_times(tau * (1.0 + delta_t), delta_t)


def per_channel_time(t_tex: torch.Tensor, t_sem: torch.Tensor, channels: int, semantic_channels: int) -> torch.Tensor:
    """A ``(B, C, 1, 1)`` tensor holding ``t_tex`` on texture channels and ``t_sem`` on semantic ones."""
    texture_channels = channels - semantic_channels
    return torch.cat(
        [
            t_tex[:, None].expand(-1, texture_channels),
            t_sem[:, None].expand(-1, semantic_channels),
        ],
        dim=1,
    )[:, :, None, None]


def interpolate(x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t x_data + (1 - t) noise`` with ``t`` broadcastable to the latent."""
    return t * x_data + (1.0 - t) * noise
