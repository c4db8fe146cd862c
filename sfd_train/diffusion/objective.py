"""The asynchronous flow-matching objective of SFD.

For a global time ``tau`` per sample the semantic and texture parts are noised at
their own times (see :mod:`sfd_train.diffusion.schedule`). The loss has three terms,
each returned separately:

- ``mse``: ``mean_{C,H,W}(w_c (v - u)^2)`` with ``w_c = semantic_weight`` on semantic
  channels and 1 on texture channels (divided by C*H*W, not by the weights' sum);
- ``cos``: ``mean_{H,W}(1 - cos(v, u))``, the cosine over all channels at each position;
- ``repa``: the alignment of the projected hidden states with the DINOv2 features, per
  ``repa_mode`` as the authors define it: ``cos`` = ``mean_tokens(1 - cos(proj, dino))``
  (the paper's), ``mse`` = ``mean_{tokens,D}((proj - dino)^2)`` on the raw features (no
  normalisation), ``cos_mse`` = the average of the two (the 80-epoch recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfd_train.config.schema import ModelConfig, ObjectiveConfig
from sfd_train.diffusion.schedule import interpolate, per_channel_time, sample_global_time, training_times


@dataclass
class LossInputs:
    """Everything random about one training batch, drawn once so it can be replayed."""

    noise: torch.Tensor
    tau: torch.Tensor
    labels: torch.Tensor


def draw_loss_inputs(
    x_data: torch.Tensor,
    labels: torch.Tensor,
    model_config: ModelConfig,
    objective: ObjectiveConfig,
    generator: torch.Generator | None = None,
    label_dropout: bool = True,
) -> LossInputs:
    """Draws noise, global times and (with ``label_dropout``) null-class replacements."""
    batch = x_data.shape[0]
    noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
    tau = sample_global_time(
        batch, objective.time_sampling, logit_mean=objective.logit_mean, logit_std=objective.logit_std,
        generator=generator, device=x_data.device,
    )
    if label_dropout and model_config.class_dropout_prob > 0:
        drop = torch.rand(batch, generator=generator, device=x_data.device) < model_config.class_dropout_prob
        labels = torch.where(drop, torch.full_like(labels, model_config.num_classes), labels)
    return LossInputs(noise=noise, tau=tau, labels=labels)


def channel_weights(channels: int, semantic_channels: int, semantic_weight: float, device=None) -> torch.Tensor:
    weights = torch.ones(channels, device=device)
    if semantic_channels:
        weights[channels - semantic_channels:] = semantic_weight
    return weights


def repa_alignment(projection: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample REPA term of ``projection`` and ``targets``, both ``(B, tokens, D)``."""
    cos = (1.0 - F.cosine_similarity(projection, targets, dim=-1)).mean(dim=1)
    if mode == "cos":
        return cos
    mse = ((projection - targets) ** 2).mean(dim=(1, 2))
    if mode == "mse":
        return mse
    if mode == "cos_mse":
        return 0.5 * (cos + mse)
    raise ValueError(f"unknown REPA mode {mode!r}; known: {', '.join(REPA_MODES)}")


REPA_MODES = ("cos", "mse", "cos_mse")


def loss_terms(
    model: nn.Module,
    x_data: torch.Tensor,
    inputs: LossInputs,
    features: torch.Tensor | None,
    *,
    semantic_channels: int,
    delta_t: float,
    semantic_weight: float,
    repa_mode: str = "cos",
) -> dict[str, torch.Tensor]:
    """Per-sample loss terms ``{"mse", "cos", "repa"}`` (``repa`` only with features).

    Args:
        model: the network (or its parallel wrapper); called with ``with_projection=True``, it
            returns ``(velocity, projection)`` in either mode.
        x_data: clean composite latents ``(B, C, H, W)``.
        inputs: noise, global times and labels from :func:`draw_loss_inputs`.
        features: REPA targets ``(B, D, H', W')`` or None.
        repa_mode: ``cos``, ``mse`` or ``cos_mse`` (see :func:`repa_alignment`); unweighted.
    """
    channels = x_data.shape[1]
    t_tex, t_sem = training_times(inputs.tau, delta_t)
    t = per_channel_time(t_tex, t_sem, channels, semantic_channels).to(x_data.dtype)
    x_t = interpolate(x_data, inputs.noise, t)
    target = x_data - inputs.noise
    velocity, projection = model(x_t, t_tex, t_sem, inputs.labels, with_projection=True)
    velocity = velocity.float()
    weights = channel_weights(channels, semantic_channels, semantic_weight, x_data.device)
    terms = {
        "mse": ((velocity - target) ** 2 * weights[None, :, None, None]).mean(dim=(1, 2, 3)),
        "cos": (1.0 - F.cosine_similarity(velocity, target, dim=1)).mean(dim=(1, 2)),
    }
    if features is not None and projection is not None:
        targets = features.flatten(2).transpose(1, 2).float()
        terms["repa"] = repa_alignment(projection.float(), targets, repa_mode)
    return terms


def objective_terms(
    model: nn.Module,
    x_data: torch.Tensor,
    inputs: LossInputs,
    features: torch.Tensor | None,
    model_config: ModelConfig,
    objective: ObjectiveConfig,
) -> dict[str, torch.Tensor]:
    """:func:`loss_terms` with every setting taken from the run's config."""
    return loss_terms(
        model, x_data, inputs, features,
        semantic_channels=model_config.semantic_channels, delta_t=model_config.delta_t,
        semantic_weight=objective.semantic_weight, repa_mode=objective.repa_mode,
    )


def draw_global_inputs(
    global_batch: int,
    sample_shape: tuple[int, ...],
    model_config: ModelConfig,
    objective: ObjectiveConfig,
    generator: torch.Generator,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, global times and label-dropout flags for every sample of a global batch.

    Drawing for the whole global batch from one generator and slicing per rank makes a
    sample's randomness depend on its position in the global batch only, not on how
    many ranks or accumulation steps share the batch.

    Returns:
        ``(noise (G, *sample_shape), tau (G,), drop (G,) bool)``.
    """
    noise = torch.randn((global_batch, *sample_shape), generator=generator, device=device)
    tau = sample_global_time(
        global_batch, objective.time_sampling, logit_mean=objective.logit_mean, logit_std=objective.logit_std,
        generator=generator, device=device,
    )
    drop = torch.rand(global_batch, generator=generator, device=device) < model_config.class_dropout_prob
    return noise, tau, drop


def combine_terms(terms: dict[str, torch.Tensor], objective: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """``{"loss": weighted sum of batch means (for backward), each term's batch mean (detached)}``."""
    weights = {"mse": 1.0, "cos": objective.cos_weight, "repa": objective.repa_weight}
    out = {"loss": sum(weights[name] * value.mean() for name, value in terms.items())}
    out.update({name: value.mean().detach() for name, value in terms.items()})
    return out


def sfd_loss(
    model: nn.Module,
    x_data: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor | None,
    model_config: ModelConfig,
    objective: ObjectiveConfig,
    generator: torch.Generator | None = None,
    label_dropout: bool = True,
) -> dict[str, torch.Tensor]:
    """One batch of the SFD objective.

    Returns:
        ``{"loss": weighted total (scalar, for backward), "mse", "cos", "repa": batch means
        (detached, for logging; "repa" only with features)}``.
    """
    inputs = draw_loss_inputs(x_data, labels, model_config, objective, generator, label_dropout)
    terms = objective_terms(
        model, x_data, inputs, features if objective.repa_weight > 0 else None, model_config, objective,
    )
    return combine_terms(terms, objective)
