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
from sfd_train.engine.tensor_parallel import (
    from_checkpoint_view,
    to_checkpoint_view,
)

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


class ModelState:
    """DCP-Stateful view of a (possibly sharded) model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return to_checkpoint_view(get_model_state_dict(self.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, from_checkpoint_view(state), options=StateDictOptions(strict=True))


class _OptimizerState:
    """DCP-Stateful view of the optimizer and the LR schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": to_checkpoint_view(get_optimizer_state_dict(self.model, self.optimizer)),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, from_checkpoint_view(state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])


class TorchStrategy(Strategy):
    """DDP or FSDP2 with a torch optimizer; the EMA is a module sharded like the model."""

    def __init__(self, wrapped, model, ema, optimizer, scheduler, grad_clip: float, kind: str,
                 tensor_parallel: bool = False):
        self.wrapped, self.model, self.ema = wrapped, model, ema
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.kind = grad_clip, kind
        self.tensor_parallel = tensor_parallel
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
        if self.tensor_parallel:
            norm = global_grad_norm(params)
            if self.grad_clip > 0:
                # torch's clip_grad_norm_ formula, applied to the local tensors.
                scale = torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0)
                torch._foreach_mul_([local_tensor(p.grad) for p in params], scale)
        else:
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
            "model": ModelState(self.model),
            "ema": ModelState(self.ema),
            "optim": _OptimizerState(self.model, self.optimizer, self.scheduler),
        }


def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients, each element counted once, with one all-reduce.

    Under tensor parallel the gradients live on different meshes (FSDP's data-parallel mesh for
    replicated layers, the 2-D (data, tp) mesh for split ones), which torch's clip_grad_norm_
    cannot combine; here each rank adds the squares of its local elements, divided by the number
    of ranks that hold a copy of them.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    by_copies: dict[int, list[torch.Tensor]] = {}
    for p in params:
        grad, copies = p.grad, world
        if isinstance(grad, DTensor):
            mesh = grad.device_mesh
            copies = world // mesh.size()
            for dim, placement in enumerate(grad.placements):
                if placement.is_replicate():
                    copies *= mesh.size(dim)
            grad = grad.to_local()
        by_copies.setdefault(copies, []).append(grad.detach())
    # One fused norm per group (a few groups), not one kernel per parameter: this runs every step.
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for copies, grads in by_copies.items():
        total += torch.stack(torch._foreach_norm(grads)).double().square().sum() / copies
    dist.all_reduce(total)
    return total.sqrt().float()

