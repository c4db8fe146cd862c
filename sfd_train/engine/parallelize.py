"""Applies parallelism to a model defined on the meta device, in torchtitan's order:
tensor parallel -> activation checkpointing -> compile -> sharding (DDP or FSDP2), then
materialises and initialises each rank's part (:mod:`sfd_train.engine.materialize`).

DeepSpeed ZeRO lives in :mod:`sfd_train.engine.zero`; both return a
:class:`~sfd_train.engine.strategy.Strategy`.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from sfd_train.config.schema import Config
from sfd_train.engine.compile import compile_blocks
from sfd_train.engine.distributed import World
from sfd_train.engine.materialize import InitPlan, copy_local_state, define_on_meta
from sfd_train.engine.optim import build_adamw, build_scheduler
from sfd_train.engine.strategy import TorchStrategy
from sfd_train.engine.tensor_parallel import apply_tensor_parallel
from sfd_train.engine.weights import load_initial_weights

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wraps every block so its activations are recomputed in backward."""
    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def device_meshes(world: World, config: Config):
    """``(data-parallel mesh, tensor-parallel mesh or None)`` from ``parallel.mesh_shape``.

    The data-parallel mesh is 1-D ``(dp_shard,)``, or 2-D ``(dp_replicate, dp_shard)`` for hybrid
    sharding, where FSDP2 shards along ``dp_shard`` and all-reduces gradients along ``dp_replicate``.
    ``tp`` is the innermost dimension, so a TP group is consecutive ranks (one node), then come the
    shard groups: with one shard group per node the parameter traffic stays in the node.
    """
    replicate, shard, tp = config.parallel.mesh_shape(world.world_size)
    dims = [("dp_replicate", replicate)] if replicate > 1 else []
    dims.append(("dp_shard", shard))
    if tp > 1:
        dims.append(("tp", tp))
    names = tuple(name for name, _ in dims)
    mesh = init_device_mesh(world.device.type, tuple(size for _, size in dims), mesh_dim_names=names)
    data_names = tuple(name for name in names if name != "tp")
    data = mesh[data_names] if len(data_names) > 1 else mesh["dp_shard"]
    return data, mesh["tp"] if tp > 1 else None


def apply_fsdp2(model: nn.Module, mesh, config: Config) -> None:
    """``fully_shard`` per block, then the root (embedders, final layer, REPA projector)."""
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[config.parallel.param_dtype], reduce_dtype=DTYPES[config.parallel.reduce_dtype]
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=config.parallel.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=config.parallel.reshard_after_forward)


def prepare_blocks(model: nn.Module, config: Config) -> None:
    """The strategy-independent steps: activation checkpointing, then per-block compile.

    (``parallel.compile_scope: step`` compiles the loss function instead; see
    :mod:`sfd_train.engine.compile`.)
    """
    if config.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.parallel.compile and config.parallel.compile_scope == "blocks":
        compile_blocks(model, config.parallel)


def define_model_and_ema(build: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module, InitPlan]:
    """The model and its EMA defined on the meta device (no memory), and the model's recorded
    initialisation. The EMA is a frozen twin; it gets its values from the model's, shard by shard."""
    model, plan = define_on_meta(build)
    ema = copy.deepcopy(model).requires_grad_(False)  # a copy of meta tensors: no data
    return model, ema.eval(), plan


def initialise(model: nn.Module, ema: nn.Module, plan: InitPlan, init_from: str | None) -> None:
    """Gives the materialised (possibly sharded) model and EMA their first values, each rank its part:
    the recorded initialisation, then ``checkpoint.init_from``'s weights if given; the EMA starts as
    a copy of the model's local shards (or the checkpoint's EMA)."""
    plan.replay(model)
    copy_local_state(ema, model)
    if init_from:
        load_initial_weights(model, ema, init_from)


def parallelize_torch(build: Callable[[], nn.Module], world: World, config: Config,
                      find_unused_parameters: bool = False) -> TorchStrategy:
    """DDP or FSDP2 (HSDP, TP) with AdamW and the EMA; no rank ever holds a model it does not keep.

    The model and the EMA are defined on the meta device, parallelised there, then materialised on
    the device (``to_empty``: FSDP2 allocates this rank's shards only, DDP the whole model it needs)
    and initialised (:func:`initialise`): bit for bit the values of the full build, on any number of
    ranks and any layout.

    Args:
        build: makes the model (the task's ``build_model``); called on the meta device.
        find_unused_parameters: some parameters get no gradient (DDP must look for them).
    """
    model, ema, plan = define_model_and_ema(build)
    data_mesh = tp_mesh = None
    if config.parallel.strategy == "fsdp2":
        data_mesh, tp_mesh = device_meshes(world, config)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
        apply_tensor_parallel(ema, tp_mesh)
    prepare_blocks(model, config)
    if config.parallel.strategy == "fsdp2":
        apply_fsdp2(model, data_mesh, config)
        apply_fsdp2(ema, data_mesh, config)
    elif config.parallel.strategy != "ddp":
        raise ValueError(f"parallelize_torch does not handle parallel.strategy={config.parallel.strategy!r}")
    model.to_empty(device=world.device)
    ema.to_empty(device=world.device)
    initialise(model, ema, plan, config.checkpoint.init_from)
    if config.parallel.strategy == "fsdp2":
        wrapped: nn.Module = model
    else:
        wrapped = DistributedDataParallel(
            model,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    optimizer = build_adamw(model.parameters(), config.optimizer, world.device)
    scheduler = build_scheduler(optimizer, config.optimizer, config.train.max_steps)
    return TorchStrategy(
        wrapped=wrapped, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
        grad_clip=config.train.grad_clip, kind=config.parallel.strategy, tensor_parallel=tp_mesh is not None,
    )
