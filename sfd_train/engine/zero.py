"""DeepSpeed ZeRO stages 1-3 behind the :class:`~sfd_train.engine.strategy.Strategy` interface.

Parameters and optimizer state stay fp32 (compute is bf16 through autocast), so the
EMA can be taken from the very weights the optimizer updates: from the full
replicas under ZeRO-1/2 and from each rank's own partition (``ds_tensor``) under
ZeRO-3. The DeepSpeed JSON config is generated from ours; expert keys in
``parallel.deepspeed`` are merged into it last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sfd_train.config.schema import Config
from sfd_train.device import deepspeed_accelerator
from sfd_train.engine.distributed import World
from sfd_train.engine.optim import build_adamw, build_scheduler
from sfd_train.engine.parallelize import define_model_and_ema, initialise, prepare_blocks
from sfd_train.engine.strategy import Strategy, clean_name
from sfd_train.safe_load import load_torch_file

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(config: Config, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON config for our config on ``world_size`` ranks."""
    stage = ZERO_STAGES[config.parallel.strategy]
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": device_type != "cpu"}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
        replicate, shard, _ = config.parallel.mesh_shape(world_size)
        if replicate > 1:
            # ZeRO++ hierarchical partitioning: the forward/backward gathers read a copy of the
            # parameters sharded inside each group of `shard` ranks (a node), not across all ranks.
            zero["zero_hpz_partition_size"] = shard
    generated = {
        "train_batch_size": config.train.global_batch_size,
        "train_micro_batch_size_per_gpu": config.train.per_rank_batch(world_size),
        "gradient_accumulation_steps": config.train.accumulation_steps(world_size),
        "gradient_clipping": float(config.train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "communication_data_type": "bf16" if config.parallel.reduce_dtype == "bf16" else "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, config.parallel.deepspeed)


def import_deepspeed(device_type: str):
    """Imports DeepSpeed with its accelerator matched to ours (it must be set before import)."""
    os.environ.setdefault("DS_ACCELERATOR", deepspeed_accelerator(device_type))
    import deepspeed

    return deepspeed


def _deepspeed_data_classes() -> dict[str, type]:
    """The bookkeeping classes DeepSpeed pickles into its checkpoint files (plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {f"{c.__module__}.{c.__qualname__}": c
            for c in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def use_safe_checkpoint_reads(engine) -> None:
    """Makes ``engine`` read its checkpoint files with the restricted unpickler.

    DeepSpeed's torch checkpoint engine reads them with ``weights_only=False``, which would let a
    checkpoint folder run code; only its file reads change (a subclass of its own engine).
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed's checkpoint engine is {type(engine.checkpoint_engine).__name__}; only its "
                           "torch engine is supported (its reads are made safe here)")
    allowed = _deepspeed_data_classes()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_torch_file(path, map_location=map_location, allowed=allowed)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe


class ZeroStrategy(Strategy):
    """A DeepSpeed engine with our AdamW and schedule as its client optimizer."""

    def __init__(self, build: Callable[[], nn.Module], world: World, config: Config):
        deepspeed = import_deepspeed(world.device.type)
        self.deepspeed = deepspeed
        self.kind = config.parallel.strategy
        self.stage = ZERO_STAGES[self.kind]
        # DeepSpeed takes the whole, initialised model on every rank (ZeRO-3 partitions it in
        # initialize). The EMA is a whole copy too: the EMA itself under ZeRO-1/2; under ZeRO-3 the
        # module that gathered EMA partitions are loaded into for sampling and export.
        model, self.ema, plan = define_model_and_ema(build)
        model.to_empty(device=world.device)
        self.ema.to_empty(device=world.device)
        initialise(model, self.ema, plan, config.checkpoint.init_from)
        prepare_blocks(model, config)
        optimizer = build_adamw(model.parameters(), config.optimizer, world.device)
        scheduler = build_scheduler(optimizer, config.optimizer, config.train.max_steps)
        self.ds_config = deepspeed_config(config, world.world_size, world.device.type)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config, dist_init_required=False
        )
        use_safe_checkpoint_reads(engine)
        self.engine = self.wrapped = engine
        self.model = engine.module
        self.optimizer, self.scheduler = optimizer, scheduler
        self._params = [(clean_name(n), p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.stage == 3:
            ema_params = dict(self.ema.named_parameters())
            self._ema_parts = [self._partition_of(ema_params[name], p) for name, p in self._params]
        else:
            ema_params = dict(self.ema.named_parameters())
            self._ema_parts = [ema_params[name] for name, _ in self._params]

    @staticmethod
    def _partition_of(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This rank's ZeRO-3 partition of ``full``, laid out like ``param.ds_tensor`` (zero-padded)."""
        size = param.ds_tensor.numel()
        flat = full.detach().reshape(-1).to(param.ds_tensor.device, param.ds_tensor.dtype)
        start = torch.distributed.get_rank() * size
        part = torch.zeros(size, dtype=flat.dtype, device=flat.device)
        chunk = flat[start:start + size]
        part[: chunk.numel()] = chunk
        return part.view_as(param.ds_tensor)

    def _current_parts(self) -> list[torch.Tensor]:
        return [(p.ds_tensor if self.stage == 3 else p).detach() for _, p in self._params]

    def backward(self, loss, accumulation_steps, last_micro_batch):
        # DeepSpeed divides by the accumulation steps itself and counts micro-batches:
        # its step() must follow every backward; it acts at the accumulation boundary.
        self.engine.backward(loss)
        if not last_micro_batch:
            self.engine.step()

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float(norm) if norm is not None else float("nan"))

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        torch._foreach_lerp_(self._ema_parts, self._current_parts(), 1.0 - decay)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @torch.no_grad()
    def _gathered(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Full weights (model or EMA) on every rank; under ZeRO-3 via an all-gather."""
        params = [p for _, p in self._params]
        if use_ema:
            for p, part in zip(params, self._ema_parts):
                p.ds_tensor.data, part.data = part.data, p.ds_tensor.data
        try:
            with self.deepspeed.zero.GatheredParameters(params):
                return {name: p.detach().cpu().clone() for name, p in self._params}
        finally:
            if use_ema:
                for p, part in zip(params, self._ema_parts):
                    p.ds_tensor.data, part.data = part.data, p.ds_tensor.data

    def _full_with_buffers(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        full = {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}
        full.update(trainable)
        return full

    def ema_for_sampling(self) -> nn.Module:
        if self.stage == 3:
            self.ema.load_state_dict(self._full_with_buffers(self._gathered(use_ema=True)), strict=True)
        return self.ema

    def full_state_dicts(self):
        if self.stage == 3:
            return (
                self._full_with_buffers(self._gathered(use_ema=False)),
                self._full_with_buffers(self._gathered(use_ema=True)),
            )
        model_sd = {clean_name(k): v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return model_sd, {k: v.detach().cpu().clone() for k, v in self.ema.state_dict().items()}

    # Checkpoints: DeepSpeed's own format, the full weights (for export and for the EMA
    # under ZeRO-1/2) and, under ZeRO-3, each rank's EMA partition (exact resume).
    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag="deepspeed", client_state=client_state)
        rank = torch.distributed.get_rank()
        model_sd, ema_sd = self.full_state_dicts()
        if rank == 0:
            torch.save({"model": model_sd, "ema": ema_sd}, directory / "weights.pt")
        if self.stage == 3:
            torch.save([t.cpu() for t in self._ema_parts], directory / f"ema_partition_rank{rank:05d}.pt")

    def load(self, directory: Path) -> dict[str, Any]:
        _, client_state = self.engine.load_checkpoint(
            str(directory), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        rank = torch.distributed.get_rank()
        with torch.no_grad():
            if self.stage == 3:
                parts = load_torch_file(directory / f"ema_partition_rank{rank:05d}.pt")
                for mine, saved in zip(self._ema_parts, parts):
                    mine.copy_(saved)
            else:
                weights = load_torch_file(directory / "weights.pt")
                self.ema.load_state_dict(weights["ema"])
        return client_state or {}
