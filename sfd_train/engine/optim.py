"""AdamW and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from sfd_train.config.schema import OptimizerConfig
from sfd_train.device import has_fused_adamw


def build_adamw(params: Iterable[torch.nn.Parameter], config: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused where the device has the kernel."""
    fused = {"on": True, "off": False, "auto": has_fused_adamw(device)}[config.fused]
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


def lr_factor(step: int, config: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.warmup_start + (1.0 - config.warmup_start) * (step + 1) / config.warmup_steps
    begin = max(config.warmup_steps, config.decay_start)
    if config.schedule == "constant" or step < begin:
        return 1.0
    span = max(1, max_steps - begin)
    progress = min(1.0, (step - begin) / span)
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, max_steps))


def apply_optimizer_config(optimizer: torch.optim.Optimizer, scheduler, config: OptimizerConfig) -> None:
    """Makes a restored optimizer and schedule follow ``config`` from the next step on.

    Loading a checkpoint restores the saved run's hyperparameters along with the
    moments; a resumed run may change them (a lower lr after a spike, a longer
    schedule), and what runs must be what its config says. The schedule's shape comes
    from the config already (its factor function is never saved); this resets its
    base and the values AdamW reads. With an unchanged config every value is what the
    checkpoint held, so the trajectory is unchanged.
    """
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(lr=config.lr * factor, initial_lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                     weight_decay=config.weight_decay)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
