"""Three-phase sampling of SFD.

Global time ``s`` runs from 0 to ``1 + dt``; ``t_sem = min(s, 1)``, ``t_tex = max(s - dt, 0)``.
The texture velocity is applied only while ``s >= dt`` and the semantic velocity only
while ``s <= 1``: phase I moves semantics only, phase II both, phase III texture only.

Fixed-grid solvers (Euler, Heun) reproduce the published sampler: the grid is
``torch.linspace(0, 1 + dt, num_steps + 1)`` in float32 and the phase masks are
evaluated, in float32, at the start of each step. With dt = 0.3 and 13 steps the grid
point meant to be 0.3 is 0.29999998, so the step starting there does not yet move the
texture; this is kept on purpose. (Evaluating the masks at the start of a step also makes the
fixed-grid solvers first order at the two phase switches, whatever their own order.)
dopri5 integrates each phase separately, so its error control never straddles a
switch of the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sfd_train.config.schema import ModelConfig, SamplerConfig
from sfd_train.diffusion.schedule import part_times


@dataclass
class Guidance:
    """Classifier-free guidance or autoguidance.

    Args:
        scale_sem: guidance scale of the semantic velocity (1 = none).
        scale_tex: guidance scale of the texture velocity (1 = none).
        null_class: label of the unconditional branch (classifier-free guidance).
        interval: each part is guided only while its own time lies in [low, high].
        guide_model: autoguidance: a weaker model of the same family, conditional on
            the same labels, replaces the unconditional branch. It may differ in size.
    """

    scale_sem: float = 1.0
    scale_tex: float = 1.0
    null_class: int | None = None
    interval: tuple[float, float] = (0.0, 1.0)
    guide_model: nn.Module | None = None

    @property
    def active(self) -> bool:
        return self.scale_sem != 1.0 or self.scale_tex != 1.0


class VelocityField:
    """The composite velocity at global time ``s``, guidance included.

    Args:
        model: the main network, called as ``model(x, t_tex, t_sem, y, with_projection=False) -> velocity``.
        labels: class labels ``(B,)``.
        delta_t: the semantic-first offset.
        semantic_channels: how many of the last channels are semantic.
        guidance: optional guidance.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, delta_t: float, semantic_channels: int,
                 guidance: Guidance | None = None):
        self.model = model
        self.labels = labels
        self.delta_t = delta_t
        self.semantic_channels = semantic_channels
        self.guidance = guidance if guidance is not None and guidance.active else None
        if self.guidance is not None and self.guidance.guide_model is None and self.guidance.null_class is None:
            raise ValueError("classifier-free guidance needs null_class (the model's num_classes)")

    def _split_scale(self, x: torch.Tensor, t_tex: torch.Tensor, t_sem: torch.Tensor) -> torch.Tensor:
        """Per-channel guidance scale ``(B, C, 1, 1)``; 1 where a part is outside the interval."""
        g = self.guidance
        low, high = g.interval
        tex_on = ((t_tex >= low) & (t_tex <= high)).to(x.dtype)
        sem_on = ((t_sem >= low) & (t_sem <= high)).to(x.dtype)
        tex_scale = 1.0 + (g.scale_tex - 1.0) * tex_on
        sem_scale = 1.0 + (g.scale_sem - 1.0) * sem_on
        texture_channels = x.shape[1] - self.semantic_channels
        return torch.cat(
            [tex_scale[:, None].expand(-1, texture_channels), sem_scale[:, None].expand(-1, self.semantic_channels)],
            dim=1,
        )[:, :, None, None]

    def __call__(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        s = s.reshape(()).expand(batch)
        t_tex, t_sem = part_times(s, self.delta_t)
        g = self.guidance
        if g is None:
            return self.model(x, t_tex, t_sem, self.labels, with_projection=False)
        if g.guide_model is not None:
            cond = self.model(x, t_tex, t_sem, self.labels, with_projection=False)
            uncond = g.guide_model(x, t_tex, t_sem, self.labels, with_projection=False)
        else:
            # One batched pass for both branches, as the published sampler does.
            both = self.model(
                torch.cat([x, x]), torch.cat([t_tex, t_tex]), torch.cat([t_sem, t_sem]),
                torch.cat([self.labels, torch.full_like(self.labels, g.null_class)]), with_projection=False,
            )
            cond, uncond = both.chunk(2)
        return uncond + self._split_scale(x, t_tex, t_sem) * (cond - uncond)


def phase_mask(s: torch.Tensor, delta_t: float, channels: int, semantic_channels: int) -> torch.Tensor:
    """``(1, C, 1, 1)`` mask: texture moves while ``s >= dt``, semantics while ``s <= 1``.

    ``s`` is a float32 scalar tensor and the comparisons happen in float32.
    """
    texture = (s >= delta_t).to(torch.float32).expand(channels - semantic_channels)
    semantic = (s <= 1.0).to(torch.float32).expand(semantic_channels)
    return torch.cat([texture, semantic])[None, :, None, None]


def time_grid(num_steps: int, delta_t: float, timestep_shift: float = 0.0, device=None) -> torch.Tensor:
    """The float32 grid of global times ``linspace(0, 1 + dt, num_steps + 1)``, optionally shifted.

    A shift ``k > 0`` maps the normalised time ``u = s / (1 + dt)`` to ``u / (u + k (1 - u))``.
    """
    end = 1.0 + delta_t
    grid = torch.linspace(0.0, end, num_steps + 1, dtype=torch.float32, device=device)
    if timestep_shift > 0:
        u = grid / end
        grid = u / (u + timestep_shift * (1.0 - u)) * end
    return grid


@torch.no_grad()
def integrate_fixed(field: VelocityField, x: torch.Tensor, grid: torch.Tensor, method: str) -> torch.Tensor:
    """Euler or Heun over ``grid``; masks taken at the start of each step."""
    channels, semantic = x.shape[1], field.semantic_channels
    for i in range(len(grid) - 1):
        s, s_next = grid[i], grid[i + 1]
        step = s_next - s
        mask = phase_mask(s, field.delta_t, channels, semantic).to(x.dtype)
        velocity = field(s, x)
        if method == "heun":
            x_pred = x + step * mask * velocity
            velocity = 0.5 * (velocity + field(s_next, x_pred))
        x = x + step * mask * velocity
    return x


@torch.no_grad()
def integrate_dopri5(field: VelocityField, x: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Adaptive dopri5 (torchdiffeq), one solve per phase."""
    from torchdiffeq import odeint

    dt = field.delta_t
    channels, semantic = x.shape[1], field.semantic_channels
    if dt > 0:
        phases = [(0.0, dt, (False, True)), (dt, 1.0, (True, True)), (1.0, 1.0 + dt, (True, False))]
    else:
        phases = [(0.0, 1.0, (True, True))]
    for start, end, (texture_on, semantic_on) in phases:
        mask = torch.cat([
            torch.full((channels - semantic,), float(texture_on)), torch.full((semantic,), float(semantic_on))
        ]).to(device=x.device, dtype=x.dtype)[None, :, None, None]
        times = torch.tensor([start, end], dtype=torch.float32, device=x.device)
        x = odeint(lambda s, state: mask * field(s, state), x, times, method="dopri5", atol=atol, rtol=rtol)[-1]
    return x


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    delta_t: float,
    semantic_channels: int,
    method: str = "euler",
    num_steps: int = 250,
    guidance: Guidance | None = None,
    timestep_shift: float = 0.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
) -> torch.Tensor:
    """Integrates from noise (global time 0) to data (global time ``1 + dt``).

    Args:
        model: the network (asked for the velocity alone, so its train/eval mode does not matter).
        noise: initial composite latents ``(B, C, H, W)``.
        labels: class labels ``(B,)``.
        delta_t, semantic_channels: as the model was trained.
        method: ``"euler"``, ``"heun"`` (fixed grid of ``num_steps``) or ``"dopri5"``.
        guidance: optional classifier-free guidance or autoguidance.
        timestep_shift: optional shift of the fixed grid toward noise (k > 1) or data (k < 1).

    Returns:
        The sampled composite latents (still normalised).
    """
    field = VelocityField(model, labels, delta_t, semantic_channels, guidance)
    if method in ("euler", "heun"):
        grid = time_grid(num_steps, delta_t, timestep_shift, device=noise.device)
        return integrate_fixed(field, noise, grid, method)
    if method == "dopri5":
        return integrate_dopri5(field, noise, atol, rtol)
    raise ValueError(f"unknown sampling method {method!r}; choose euler, heun or dopri5")


def sample_with_config(
    model: nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    model_config: ModelConfig,
    sampler: SamplerConfig,
    guide_model: nn.Module | None = None,
    num_steps: int | None = None,
) -> torch.Tensor:
    """:func:`sample` with settings from the config sections."""
    guidance = Guidance(
        scale_sem=sampler.cfg_scale_sem, scale_tex=sampler.cfg_scale_tex, null_class=model_config.num_classes,
        interval=tuple(sampler.guidance_interval), guide_model=guide_model,
    )
    return sample(
        model, noise, labels, delta_t=model_config.delta_t, semantic_channels=model_config.semantic_channels,
        method=sampler.method, num_steps=num_steps or sampler.num_steps, guidance=guidance,
        timestep_shift=sampler.timestep_shift, atol=sampler.atol, rtol=sampler.rtol,
    )
