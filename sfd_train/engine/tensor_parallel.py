"""Tensor parallel inside a sample (Megatron's split) on PyTorch DTensor, applied to a built model.

Per block, on the ``tp`` mesh dimension:

* attention: the fused ``qkv`` Linear is split column-wise **by heads** (each rank holds the q, k
  and v rows of its heads), the q/k norms are replicated, ``proj`` is split row-wise;
* MLP: SwiGLU's fused ``w12`` is split column-wise by hidden units (each rank holds matching rows
  of both halves), ``w3`` row-wise; the GELU MLP's ``fc1`` / ``fc2`` likewise;
* everything else (norms, adaLN modulation, embedders, final layer, REPA projector) is replicated:
  those layers are small or per sample, so splitting them would cost more messages than it saves.

Communication per block and micro-batch: one all-reduce of the ``(B, N, D)`` activation after
``proj`` and one after ``w3`` in forward, and one each for the input gradients of ``qkv`` and
``w12`` in backward (Megatron's f/g operators).

The fused weights cannot use DTensor's contiguous ``Shard(0)``: their rows are ``[q | k | v]``
(``[x1 | x2]`` for w12), so a rank's heads are one slice of each part. They are placed
``_StridedShard(0, split_factor=parts)``, and the model runs on the local slices: while a TP'd
module runs, its DTensor parameters are swapped for their local tensors (differentiable, so the
gradients come back as DTensors), and the model file stays free of parallelism (the attention
reads its number of heads from the weight). Checkpoints describe such a parameter's local rows as
several row blocks of the global tensor (DCP's ``CheckpointableTensor``), so a checkpoint saved
with one ``tp`` loads with any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

from sfd_train.config.base import ConfigError
from sfd_train.models.layers import Attention, GeluMLP, SwiGLU


def copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; the backward all-reduces the gradient over ``mesh`` (Megatron's f).

    The ranks of a TP group each use a slice of heads of the same input, so each holds part of
    its gradient.
    """
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def split_by_parts(full: torch.Tensor, parts: int, mesh: DeviceMesh) -> DTensor:
    """``full`` split into ``parts`` along dim 0, each part split over ``mesh``; this rank's pieces
    concatenated (e.g. the q, k and v rows of this rank's heads)."""
    rank, size = mesh.get_local_rank(), mesh.size()
    if full.shape[0] % (parts * size):
        raise ValueError(f"dimension 0 ({full.shape[0]}) does not split into {parts} parts x tp {size}")
    local = torch.cat([part.chunk(size)[rank] for part in full.chunk(parts)]).contiguous()
    return DTensor.from_local(local, mesh, [_StridedShard(0, split_factor=parts)], run_check=False,
                              shape=full.shape, stride=full.stride())


def _distribute(module: nn.Module, name: str, make) -> None:
    """Replaces the parameter ``module.<name>`` (if any) with ``make(its data)``."""
    param = getattr(module, name)
    if param is None:
        return
    module.register_parameter(name, nn.Parameter(make(param.data), requires_grad=param.requires_grad))


class LocalParameters:
    """Runs ``module`` on the local tensors of chosen submodules' DTensor parameters.

    Args:
        module: gets a forward pre-hook (swap in, and the input's gradient all-reduced over the
            TP group) and a forward hook (swap back).
        owners: ``{submodule name: gradient placements}``. ``None`` keeps the parameter's own
            placements (a split weight); ``[Partial()]`` for a replicated weight that each rank
            applies to its slice only (the q/k norms), so its gradient is summed over the group.
    """

    def __init__(self, module: nn.Module, owners: dict[str, Any], mesh: DeviceMesh):
        self.owners = {name: module.get_submodule(name) for name in owners}
        self.grad_placements = owners
        self.mesh = mesh
        self._saved: list[tuple[nn.Module, str, nn.Parameter]] = []
        module.register_forward_pre_hook(self._swap_in)
        module.register_forward_hook(self._swap_back)

    def _swap_in(self, module, args):
        for name, owner in self.owners.items():
            for key, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    self._saved.append((owner, key, param))
                    # Bypass nn.Module.__setattr__: a plain tensor may not replace a registered Parameter.
                    owner._parameters[key] = param.to_local(grad_placements=self.grad_placements[name])
        return (copy_to_tp(args[0], self.mesh), *args[1:])

    def _swap_back(self, module, args, output):
        while self._saved:
            owner, key, param = self._saved.pop()
            owner._parameters[key] = param
        return output


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Splits every block's attention and MLP over ``mesh`` (the ``tp`` dimension), in place.

    Raises:
        ConfigError: the heads or hidden units do not divide by the TP degree.
    """
    size = mesh.size()
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if not isinstance(attn, Attention) or not isinstance(mlp, (SwiGLU, GeluMLP)):
            raise TypeError(f"tensor parallel does not know {type(attn).__name__} / {type(mlp).__name__}")
        hidden = mlp.w3.in_features if isinstance(mlp, SwiGLU) else mlp.fc2.in_features
        if attn.num_heads % size or hidden % size:
            raise ConfigError("parallel.tp", f"the model's {attn.num_heads} attention heads and {hidden} MLP hidden "
                              f"units must both divide by tp ({size})")
        for name in ("weight", "bias"):
            _distribute(attn.qkv, name, lambda t: split_by_parts(t, 3, mesh))
        for norm in (attn.q_norm, attn.k_norm):
            for name, param in list(norm.named_parameters(recurse=False)):
                _distribute(norm, name, lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False))
        parallelize_module(attn.proj, mesh, RowwiseParallel())
        LocalParameters(attn, {"qkv": None, "q_norm": [Partial()], "k_norm": [Partial()]}, mesh)
        if isinstance(mlp, SwiGLU):
            for name in ("weight", "bias"):
                _distribute(mlp.w12, name, lambda t: split_by_parts(t, 2, mesh))
            parallelize_module(mlp.w3, mesh, RowwiseParallel())
            LocalParameters(mlp, {"w12": None}, mesh)
        else:
            parallelize_module(mlp, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def is_split_by_parts(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor whose ``tp`` placement is a split by parts (see :func:`split_by_parts`)."""
    if not isinstance(t, DTensor):
        return False
    names = t.device_mesh.mesh_dim_names or ()
    return bool(names) and names[-1] == "tp" and isinstance(t.placements[-1], _StridedShard)


def global_index(t: DTensor) -> list[torch.Tensor | None]:
    """For each dimension of ``t``, the global indices of its local tensor's entries (None: all of them).

    The layouts this engine builds: tensor parallel first, on the mesh's last dimension ``tp``
    (contiguous ``Shard``, or a split by parts, see :func:`split_by_parts`), then FSDP2 shards the
    TP-local tensor along dim 0 (``torch.chunk``) over each data-parallel mesh dimension with a Shard
    placement, innermost first; Replicate dimensions hold copies. So the placements are undone from
    the mesh's last dimension to its first.
    """
    mesh, placements = t.device_mesh, t.placements
    coordinate = mesh.get_coordinate()
    names = mesh.mesh_dim_names or ()
    index: list[torch.Tensor | None] = [None] * t.dim()
    for mesh_dim in range(mesh.ndim - 1, -1, -1):
        placement = placements[mesh_dim]
        if not isinstance(placement, (Shard, _StridedShard)):
            continue
        dim, size, position = placement.dim, mesh.size(mesh_dim), coordinate[mesh_dim]
        current = index[dim] if index[dim] is not None else torch.arange(t.shape[dim])
        if isinstance(placement, _StridedShard) and names and names[mesh_dim] == "tp":
            current = torch.cat([part.chunk(size)[position] for part in current.chunk(placement.split_factor)])
        else:
            chunks = current.chunk(size)
            current = chunks[position] if position < len(chunks) else current[:0]
        index[dim] = current
    return index


def local_rows(t: DTensor) -> torch.Tensor:
    """The global row (dim 0) of each local row of ``t`` (a tensor split by parts, with FSDP's shards of it)."""
    rows = global_index(t)[0]
    rows = torch.arange(t.shape[0]) if rows is None else rows
    local = t.to_local()
    if local.shape[0] != rows.numel():
        raise AssertionError(f"{local.shape[0]} local rows, expected {rows.numel()}")
    return rows


def row_blocks(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive global rows: ``[(local start, global start, length), ...]``."""
    blocks: list[tuple[int, int, int]] = []
    for local, row in enumerate(rows.tolist()):
        if blocks and blocks[-1][1] + blocks[-1][2] == row:
            blocks[-1] = (blocks[-1][0], blocks[-1][1], blocks[-1][2] + 1)
        else:
            blocks.append((local, row, 1))
    return blocks


def checkpointable(t: DTensor) -> torch.Tensor:
    """The local tensor of a split-by-parts DTensor, described to DCP as row blocks of the global
    tensor (the ``CheckpointableTensor`` protocol): a checkpoint then holds the plain global layout,
    which any other ``tp`` (or none) reads. Loading writes into the same storage."""
    local = t.to_local()
    rest = tuple(t.shape[1:])
    blocks = row_blocks(local_rows(t))
    local.global_shape = tuple(t.shape)
    local.global_offsets = tuple((g, *(0,) * len(rest)) for _, g, _ in blocks)
    local.local_offsets = tuple((s, *(0,) * len(rest)) for s, _, _ in blocks)
    local.local_sizes = tuple((n, *rest) for _, _, n in blocks)
    local._sfd_dtensor = t
    return local


def to_checkpoint_view(state: Any) -> Any:
    """``state`` (nested dicts) with split-by-parts DTensors replaced by :func:`checkpointable` views."""
    if isinstance(state, dict):
        return {k: to_checkpoint_view(v) for k, v in state.items()}
    return checkpointable(state) if is_split_by_parts(state) else state


def from_checkpoint_view(state: Any) -> Any:
    """Undoes :func:`to_checkpoint_view` (after DCP loaded into the views in place)."""
    if isinstance(state, dict):
        return {k: from_checkpoint_view(v) for k, v in state.items()}
    return getattr(state, "_sfd_dtensor", state)
