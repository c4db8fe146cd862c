"""One interface over the ways a model can be trained in parallel.

The training loop only calls the methods of :class:`Strategy`; DDP and FSDP2 are
served by :class:`TorchStrategy`, DeepSpeed ZeRO by
:class:`sfd_train.engine.zero.ZeroStrategy`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from sfd_train.config.schema import OptimizerConfig
from sfd_train.engine.optim import apply_optimizer_config

WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without what wrappers (AC, compile, DDP) insert into it."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name.removeprefix("module.")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Strategy:
    """What the training loop needs from a parallel wrapper.

    Attributes:
        wrapped: call it for the training forward pass.
        model: the model underneath (the same object as ``wrapped`` for FSDP2).
        kind: the ``parallel.strategy`` name.
        optimizer, scheduler: the optimizer (AdamW, or DeepSpeed's around it) and its LR schedule.
    """

    wrapped: nn.Module
    model: nn.Module
    kind: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch: gradients are synchronised only on the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accumulation_steps: int, last_micro_batch: bool) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """Clips, steps the optimizer and the schedule, clears gradients; returns the grad norm."""
        raise NotImplementedError

    def update_ema(self, decay: float) -> None:
        raise NotImplementedError

    def ema_for_sampling(self) -> nn.Module:
        """A module computing the EMA model's forward; every rank must call it together."""
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    def apply_optimizer_config(self, config: OptimizerConfig) -> None:
        """After a resume: the optimizer and schedule follow ``config``, not the checkpoint's settings."""
        apply_optimizer_config(self.optimizer, self.scheduler, config)

    def full_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Unsharded CPU state dicts ``(model, ema)`` with published names (collective)."""
        raise NotImplementedError


class _ModelState:
    """DCP-Stateful view of a (possibly sharded) model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state, options=StateDictOptions(strict=True))


class _OptimizerState:
    """DCP-Stateful view of the optimizer and the LR schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class TorchStrategy(Strategy):
    """DDP or FSDP2 with a torch optimizer; the EMA is a module sharded like the model."""

    def __init__(self, wrapped, model, ema, optimizer, scheduler, grad_clip: float, kind: str):
        self.wrapped, self.model, self.ema = wrapped, model, ema
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.kind = grad_clip, kind
        ema_params = dict(ema.named_parameters())
        self._pairs = [(p, ema_params[clean_name(n)]) for n, p in model.named_parameters() if p.requires_grad]
        self.ema.eval()

    def accumulate(self, last_micro_batch: bool):
        if self.kind == "ddp" and not last_micro_batch:
            return self.wrapped.no_sync()
        if self.kind == "fsdp2":
            self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss, accumulation_steps, last_micro_batch):
        (loss / accumulation_steps).backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        # Local shards only: under FSDP2 each rank keeps the EMA of the shard it owns.
        # (Resolved every time: FSDP2 may swap a parameter's local tensor at lazy init.)
        ema = [local_tensor(e) for _, e in self._pairs]
        current = [local_tensor(p).detach() for p, _ in self._pairs]
        torch._foreach_lerp_(ema, current, 1.0 - decay)

    def ema_for_sampling(self) -> nn.Module:
        return self.ema

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def checkpoint_items(self) -> dict[str, Any]:
        """DCP-Stateful items: sharded under FSDP2, so a checkpoint can be resharded on load."""
        return {
            "model": _ModelState(self.model),
            "ema": _ModelState(self.ema),
            "optim": _OptimizerState(self.model, self.optimizer, self.scheduler),
        }

    def full_state_dicts(self):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = {clean_name(k): v for k, v in get_model_state_dict(self.model, options=options).items()}
        ema_sd = get_model_state_dict(self.ema, options=options)
        return model_sd, ema_sd

