"""The scaling model: bytes per rank per optimizer step of every collective, measured and projected.

Two halves, one file:

``measure``  Runs real 4-rank CPU trainings (gloo) of a tiny SFD model under every parallel strategy
             (ddp, fsdp2, HSDP 2x2, zero1, zero2, zero3 with DeepSpeed's defaults and per layer,
             ZeRO++ hpZ 2x2, fsdp2 + tensor parallel 2; a case the config does not accept yet is
             skipped and named), counts what each rank hands to its process groups during two
             steady-state optimizer steps, and compares that with the closed-form bytes of the same
             strategy (:func:`formula_traffic`). They must agree within 5% (exit code 1 otherwise).
``project``  Puts the same formulas, with the parameter counts of XL/1 and XXL/1 (1p0B), next to the
             step's FLOPs (``training_flops_per_image``), an assumed MFU and the link bandwidths of
             H100/H200 and Ascend 910B clusters, and projects step time and scaling efficiency at 8, 64,
             256 and 1024 devices: weak scaling (fixed images per device) and strong scaling (global
             batch 256 and 1024).

Bytes convention (both halves): for every collective we record its *payload* S (the bytes of the full
tensor: the all-reduced tensor, the gathered output, the reduce-scattered input, the broadcast tensor)
and the *bytes each rank sends* with ring algorithms, S x f(n) for a group of n ranks:
all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n, broadcast and reduce 1 (nccl-tests'
"bus bandwidth" factors). The time of a collective is then bytes-per-rank / link bandwidth.

What counts as step traffic: every collective issued between the start and the end of
``Trainer.train_step`` (forward, backward, gradient reduction, optimizer step, EMA) of the counted steps.
Start-up (parameter broadcast, DeepSpeed set-up), checkpoints and logging fall outside that window.

Usage::

    python benchmarks/scaling_model.py                 # measure, then project (3-5 minutes on 2 cores)
    python benchmarks/scaling_model.py measure         # the 4-rank CPU runs only (9 runs, 20-35 s each)
    python benchmarks/scaling_model.py measure --cases ddp fsdp2
    python benchmarks/scaling_model.py project --mfu 0.35 --inter-hop-us 4   # seconds, no runs

Outputs (``--out``, default benchmarks/results/scaling/): measured.json, projection.json,
projection.md (the table), scaling.png (the plot). docs/scaling.md explains every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "scaling"

# ---------------------------------------------------------------------------------------------
# Counting: a dispatch mode that sees every collective, eager or functional (DTensor)
# ---------------------------------------------------------------------------------------------

# Collective kind of each c10d / functional-collective op (name without namespace and overload).
OP_KINDS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter", "reduce_scatter_tensor_out": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "reduce_": "reduce",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "scatter_": "scatter", "gather_": "gather", "gather_into_tensor_": "gather",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "isend": "send", "irecv": "recv",
}

# The argument that holds the collective's full payload, by kind; functional all-gathers name only
# their input (the payload is input x group size).
PAYLOAD_ARGS = {
    "all_reduce": ("tensors", "input", "inputs"),
    "all_gather": ("output_tensor", "output_tensors", "output_lists", "outputs"),
    "reduce_scatter": ("input_tensor", "input_tensors", "inputs", "input"),
    "broadcast": ("tensors", "input"),
    "reduce": ("tensors",),
    "all_to_all": ("input", "input_tensors"),
    "scatter": ("output_tensors",),  # x group size: the root's inputs are empty on the other ranks
    "gather": ("input_tensors", "input_tensor"),  # x group size
    "send": ("tensors", "tensor"),
    "recv": ("tensors", "tensor"),
}


def ring_factor(kind: str, n: int) -> float:
    """Bytes each rank sends, as a multiple of the payload, for ``kind`` on ``n`` ranks (ring algorithms).

    These are nccl-tests' bus-bandwidth factors: a collective of payload S on n ranks takes
    S x ring_factor / link bandwidth.
    """
    if n <= 1 and kind not in ("send", "recv"):
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all", "scatter", "gather"):
        return (n - 1) / n
    if kind in ("broadcast", "reduce", "send"):
        return 1.0
    return 0.0  # recv: the sender counts the bytes


def _tensor_bytes(value: Any) -> int:
    """Bytes of a tensor or of every tensor in a (nested) list of them."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _resolve_group(bound: dict[str, Any]):
    """The ProcessGroup of a c10d op (a boxed script object) or a functional op (a group name)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    if "process_group" in bound:
        return dist.ProcessGroup.unbox(bound["process_group"])
    return _resolve_process_group(bound["group_name"])


def describe_collective(func, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """``{"kind", "group_size", "group_stride", "payload_bytes", "rank_bytes"}`` of one collective op
    call, or None when ``func`` is not a collective (e.g. ``wait_tensor``).

    The stride (distance between consecutive ranks of the group) tells the mesh dimensions apart:
    on a ``(dp_replicate, dp_shard, tp)`` mesh the innermost dimension has stride 1.
    """
    import torch.distributed as dist

    name = func._schema.name.split("::")[-1]
    kind = OP_KINDS.get(name)
    if kind is None:
        return None
    bound = {arg.name: value for arg, value in zip(func._schema.arguments, args)}
    bound.update(kwargs)
    group = _resolve_group(bound)
    n = group.size()
    payload = next((_tensor_bytes(bound[a]) for a in PAYLOAD_ARGS[kind] if a in bound), 0)
    functional = func.namespace != "c10d"
    if (kind == "all_gather" and functional) or kind in ("scatter", "gather"):
        source = bound.get("input", bound.get("inputs", bound.get("output_tensors")))
        payload = _tensor_bytes(source) * n
    ranks = dist.get_process_group_ranks(group)
    return {
        "kind": kind,
        "group_size": n,
        "group_stride": ranks[1] - ranks[0] if n > 1 else 1,
        "payload_bytes": payload,
        "rank_bytes": payload * ring_factor(kind, n),
    }


def make_counter():
    """A ``TorchDispatchMode`` that records every collective issued while it is active.

    A dispatch mode sees the ``c10d::*`` ops that ``torch.distributed``'s eager API dispatches, and
    the ``_c10d_functional::*`` ops of DTensor and compiled code (which a Python patch of
    ``torch.distributed`` would miss). For DTensor arguments it steps aside (returns
    NotImplemented), so DTensor first turns its redistribution into functional collectives on plain
    tensors, which then come back here. (The mode is off while its own handler runs, so a
    functional op's inner c10d call is not counted twice.)
    """
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CollectiveCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.records: list[dict[str, Any]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented
            if func.namespace in ("c10d", "_c10d_functional"):
                record = describe_collective(func, args, kwargs)
                if record is not None:
                    self.records.append(record)
            return func(*args, **kwargs)

    return CollectiveCounter()


def traffic_key(kind: str, size: int, stride: int) -> str:
    """``"all_gather@4/1"``: the kind, the group size and its stride (one mesh dimension)."""
    return f"{kind}@{size}/{stride}"


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Sums records per :func:`traffic_key`: calls, payload bytes, bytes per rank."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "payload_bytes": 0, "rank_bytes": 0.0})
    for r in records:
        entry = out[traffic_key(r["kind"], r["group_size"], r["group_stride"])]
        entry["calls"] += 1
        entry["payload_bytes"] += r["payload_bytes"]
        entry["rank_bytes"] += r["rank_bytes"]
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# The worker: one rank of a measured run (started by torchrun, see launch_measured_run)
# ---------------------------------------------------------------------------------------------

def run_worker(first_step: int, last_step: int, out_dir: Path, train_argv: list[str]) -> int:
    """Trains with ``sfd_train.train`` while counting the collectives of optimizer steps
    ``first_step..last_step`` (1-based, both included), then writes ``rank<r>.json`` to ``out_dir``.

    The counter is switched on around ``Trainer.train_step`` only, so the start-up, the logging
    between steps and the final checkpoint are not counted.
    """
    from sfd_train import train
    from sfd_train.engine.trainer import Trainer

    per_step: dict[int, dict[str, Any]] = {}
    original = Trainer.train_step

    def counted_train_step(self, batches):
        number = self.step + 1  # the step this call makes, 1-based as in the log
        if not first_step <= number <= last_step:
            return original(self, batches)
        counter = make_counter()
        with counter:
            result = original(self, batches)
        per_step[number] = {"summary": summarize(counter.records), "micro_batch": self.micro_batch,
                            "accumulation": self.accumulation}
        return result

    Trainer.train_step = counted_train_step
    rank = int(os.environ.get("RANK", "0"))
    try:
        code = train.main(train_argv)
    finally:
        Trainer.train_step = original
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "exit_code": code, "steps": per_step}))
    return code


# ---------------------------------------------------------------------------------------------
# What the formulas need to know about a model: its parameters, as the strategies see them
# ---------------------------------------------------------------------------------------------

# Megatron's split of a block (sfd_train/engine/tensor_parallel.py): "col" splits dim 0 of the
# weight and the bias, "row" splits dim 1 of the weight (its bias stays whole).
TP_SPLIT = {"attn.qkv": "col", "mlp.w12": "col", "mlp.fc1": "col", "attn.proj": "row", "mlp.w3": "row",
            "mlp.fc2": "row"}


@dataclass(frozen=True)
class ParamInfo:
    """One parameter: where it lives and how each strategy cuts it.

    Attributes:
        unit: the FSDP2 sharding unit, ``"blocks.<i>"`` or ``"root"`` (everything outside the blocks).
        module: the module that owns it (DeepSpeed ZeRO-3 gathers module by module).
        tp: ``"col"``, ``"row"`` or ``"rep"`` (replicated over the tensor-parallel group).
    """

    name: str
    shape: tuple[int, ...]
    trainable: bool
    unit: str
    module: str
    tp: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tp_shape(self, tp: int) -> tuple[int, ...]:
        """The shape a rank holds under tensor parallelism of degree ``tp``."""
        if tp == 1 or self.tp == "rep":
            return self.shape
        if self.tp == "col":
            return (self.shape[0] // tp, *self.shape[1:])
        return (self.shape[0], self.shape[1] // tp, *self.shape[2:]) if len(self.shape) > 1 else self.shape


@dataclass(frozen=True)
class ModelInventory:
    """The parameters of one model configuration, with the sizes the step model needs."""

    name: str
    params: tuple[ParamInfo, ...]
    buffer_numel: int
    depth: int
    hidden: int
    heads: int
    tokens: int
    flops_per_image: float

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    @property
    def units(self) -> list[str]:
        return list(dict.fromkeys(p.unit for p in self.params))


def _tp_kind(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    for suffix, kind in TP_SPLIT.items():
        if module.endswith(suffix):
            return "rep" if (kind == "row" and leaf == "bias") else kind
    return "rep"


def inventory_of(model_config, name: str = "") -> ModelInventory:
    """Builds the model on the meta device (no memory) and lists its parameters and buffers.

    Args:
        model_config: a :class:`sfd_train.config.schema.ModelConfig`.
    """
    import torch

    from sfd_train.models import build_model
    from sfd_train.models.flops import training_flops_per_image

    with torch.device("meta"):
        model = build_model(model_config)
    params = []
    for full_name, param in model.named_parameters():
        module = full_name.rpartition(".")[0]
        unit = ".".join(full_name.split(".")[:2]) if full_name.startswith("blocks.") else "root"
        params.append(ParamInfo(full_name, tuple(param.shape), param.requires_grad, unit, module, _tp_kind(full_name)))
    depth, hidden, heads = model_config.dims()
    tokens = (model_config.input_size // model_config.patch_size) ** 2
    return ModelInventory(
        name=name or model_config.name, params=tuple(params),
        buffer_numel=sum(b.numel() for b in model.buffers()), depth=depth, hidden=hidden, heads=heads, tokens=tokens,
        flops_per_image=training_flops_per_image(model_config, with_repa=model_config.use_repa),
    )


# ---------------------------------------------------------------------------------------------
# The closed-form traffic of every strategy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A parallel layout: strategy and mesh ``(dp_replicate, dp_shard, tp)``, tp innermost.

    ``dp_replicate x dp_shard x tp`` is the world size. For fsdp2 a replicate degree > 1 is HSDP,
    for zero3 it is ZeRO++ hpZ (a secondary parameter copy sharded over ``dp_shard`` ranks).
    """

    strategy: str
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1

    @property
    def name(self) -> str:
        mesh = f" {self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else ""
        if self.tp > 1:
            return ("hsdp" if self.dp_replicate > 1 else "fsdp2") + f"+tp{self.tp}" + mesh
        label = {"fsdp2": "hsdp", "zero3": "zero3-hpz"}.get(self.strategy, self.strategy)
        return (label + mesh) if self.dp_replicate > 1 else self.strategy

    def mesh(self, world: int) -> tuple[int, int, int]:
        shard = self.dp_shard if self.dp_shard != -1 else world // (self.dp_replicate * self.tp)
        if shard < 1 or self.dp_replicate * shard * self.tp != world:
            raise ValueError(f"{self.name}: {self.dp_replicate} x {shard} x {self.tp} is not {world} ranks")
        return self.dp_replicate, shard, self.tp

    def overrides(self) -> list[str]:
        out = [f"parallel.strategy={self.strategy}"]
        if self.dp_replicate > 1 or self.dp_shard != -1:
            out += [f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}"]
        if self.tp > 1:
            out.append(f"parallel.tp={self.tp}")
        return out


@dataclass(frozen=True)
class StepSettings:
    """Everything besides the model and the layout that decides a step's traffic.

    Attributes:
        micro_batch, accumulation: images per data-parallel rank per forward, and forwards per step.
        param_bytes: FSDP2 ``param_dtype`` (the gathers); DeepSpeed keeps fp32 parameters (4).
        reduce_bytes: FSDP2 ``reduce_dtype``; DeepSpeed ``communication_data_type``.
        activation_bytes: autocast dtype of the activations that tensor parallelism all-reduces.
        zero3_persistence: ``stage3_param_persistence_threshold`` (parameters with at most this many
            elements are gathered once per step, after the optimizer, and stay whole).
        zero3_release: ZeRO-3 frees a gathered parameter after its module ran (so backward gathers it
            again). False when DeepSpeed keeps the model gathered from forward to backward: its
            ``stage3_max_reuse_distance`` exceeds the model's size and its prefetch bucket holds the model.
        zero3_prefetch_elements: ``stage3_prefetch_bucket_size``; the prefetcher gathers this many
            elements in one coalesced call (0: one call per module). Sets the number of calls only.
    """

    micro_batch: int
    accumulation: int = 1
    param_bytes: int = 2
    reduce_bytes: int = 4
    activation_bytes: int = 2
    reshard_after_forward: bool = True
    zero3_persistence: int = 100_000
    zero3_release: bool = True
    zero3_prefetch_elements: int = 50_000_000
    ddp_bucket_bytes: int = 25 * 2**20
    zero_bucket_elements: int = 500_000_000


@dataclass(frozen=True)
class Flow:
    """One collective of a step, summed over its calls, as seen by one rank.

    Attributes:
        group: the mesh dimension it runs on: ``world``, ``dp_shard``, ``dp_replicate``, ``tp``
            (ZeRO++ hpZ's secondary group is ``dp_shard``).
        size, stride: the group's ranks are ``r, r + stride, ..., r + (size - 1) * stride``.
        payload_bytes: the full tensors of all calls together (see the module docstring).
        calls: collectives per step (latency, and the pieces the overlap model pipelines).
        phase: ``forward``, ``backward`` (overlapped with that pass's compute), ``step`` (after the
            backward, on the critical path) or ``inline`` (inside the compute: tensor parallelism).
    """

    kind: str
    group: str
    size: int
    stride: int
    payload_bytes: float
    calls: float
    phase: str
    what: str
    exposed_calls: float = 1

    @property
    def rank_bytes(self) -> float:
        return self.payload_bytes * ring_factor(self.kind, self.size)

    @property
    def key(self) -> str:
        return traffic_key(self.kind, self.size, self.stride)


def fsdp_padded(shape: tuple[int, ...], shards: int) -> int:
    """Elements FSDP2 moves for one parameter: dim 0 padded up to a multiple of the shard count."""
    if not shape:
        return shards
    rows = math.ceil(shape[0] / shards) * shards
    return rows * math.prod(shape[1:])


def zero3_padded(numel: int, ranks: int) -> int:
    """Elements DeepSpeed ZeRO-3 moves for one parameter: the flat tensor padded to equal partitions."""
    return math.ceil(numel / ranks) * ranks


def group_dims(world: int, layout: Layout) -> dict[str, tuple[int, int]]:
    """``{mesh dimension: (size, stride)}`` for a layout on ``world`` ranks (tp innermost)."""
    r, s, t = layout.mesh(world)
    return {"world": (world, 1), "tp": (t, 1), "dp_shard": (s, t), "dp_replicate": (r, s * t)}


def ddp_traffic(inv: ModelInventory, world: int, st: StepSettings) -> list[Flow]:
    """DDP: bucketed all-reduce of the fp32 gradients once per step (``no_sync`` on the other
    micro-batches), and the broadcast of the module buffers from rank 0 (``broadcast_buffers``) before
    the step's first forward: a forward under ``no_sync`` turns off the next forward's buffer sync."""
    grad_bytes = inv.trainable * 4  # the gradients have the parameters' dtype, fp32
    buckets = max(1, math.ceil(grad_bytes / st.ddp_bucket_bytes))
    flows = [Flow("all_reduce", "world", world, 1, grad_bytes, buckets, "backward", "gradients")]
    if inv.buffer_numel:
        flows.append(Flow("broadcast", "world", world, 1, inv.buffer_numel * 4, 1, "forward",
                          "buffers (broadcast_buffers)"))
    return flows


def fsdp2_traffic(inv: ModelInventory, world: int, layout: Layout, st: StepSettings) -> list[Flow]:
    """FSDP2 on ``(dp_replicate, dp_shard, tp)``: per unit (block or root) an all-gather of the
    padded shards in forward and again in backward (``reshard_after_forward``), one per micro-batch;
    a reduce-scatter of the gradients on the last micro-batch; with HSDP an all-reduce of each
    rank's gradient shard across the replicas; with tensor parallelism the activation all-reduces
    of each block and the all-reduce of the replicated q/k-norm gradients.
    """
    dims = group_dims(world, layout)
    (s, s_stride), (r, r_stride), (t, _) = dims["dp_shard"], dims["dp_replicate"], dims["tp"]
    units = inv.units
    gathered = sum(fsdp_padded(p.tp_shape(t), s) for p in inv.params)
    reduced = sum(fsdp_padded(p.tp_shape(t), s) for p in inv.params if p.trainable)
    m = st.accumulation
    flows = [Flow("all_gather", "dp_shard", s, s_stride, gathered * st.param_bytes * m, len(units) * m, "forward",
                  "parameters, forward", exposed_calls=m)]
    if st.reshard_after_forward:
        flows.append(Flow("all_gather", "dp_shard", s, s_stride, gathered * st.param_bytes * m, len(units) * m,
                          "backward", "parameters, backward", exposed_calls=m))
    flows.append(Flow("reduce_scatter", "dp_shard", s, s_stride, reduced * st.reduce_bytes, len(units), "backward",
                      "gradients"))
    if r > 1:
        flows.append(Flow("all_reduce", "dp_replicate", r, r_stride, reduced / s * st.reduce_bytes, len(units),
                          "backward", "gradient shards across replicas"))
    if t > 1:
        flows += tensor_parallel_traffic(inv, t, st)
    return [f for f in flows if f.size > 1]


def tensor_parallel_traffic(inv: ModelInventory, tp: int, st: StepSettings) -> list[Flow]:
    """Megatron's split: per block and micro-batch, all-reduces of the ``(B, N, D)`` activation after
    ``proj`` and ``w3`` (forward) and of the input gradients of ``qkv`` and ``w12`` (backward); the
    q/k-norm weights are replicated and applied to each rank's heads, so their gradients are
    all-reduced over the group as well (a few hundred bytes)."""
    m, depth = st.accumulation, inv.depth
    activation = st.micro_batch * inv.tokens * inv.hidden * st.activation_bytes
    norms = sum(p.numel for p in inv.params if p.module.endswith(("attn.q_norm", "attn.k_norm")) and p.trainable)
    return [
        Flow("all_reduce", "tp", tp, 1, 2 * depth * m * activation, 2 * depth * m, "inline", "activations, forward"),
        Flow("all_reduce", "tp", tp, 1, 2 * depth * m * activation, 2 * depth * m, "inline",
             "activation gradients, backward"),
        Flow("all_reduce", "tp", tp, 1, norms * st.reduce_bytes * m, 2 * depth * m, "backward", "q/k-norm gradients"),
    ]


def zero12_traffic(inv: ModelInventory, world: int, stage: int, st: StepSettings) -> list[Flow]:
    """DeepSpeed ZeRO-1/2 (0.19): the gradients are all-reduced in buckets (its default
    ``use_multi_rank_bucket_allreduce`` reduces a bucket with one all-reduce, not a reduce-scatter),
    each rank steps its partition, and the updated fp32 parameters are all-gathered after the step.
    ZeRO-2 reduces after every micro-batch's backward, ZeRO-1 once per step."""
    reductions = st.accumulation if stage == 2 else 1
    buckets = max(1, math.ceil(inv.trainable / st.zero_bucket_elements))
    return [
        Flow("all_reduce", "world", world, 1, inv.trainable * st.reduce_bytes * reductions, buckets * reductions,
             "backward", "gradients", exposed_calls=reductions),
        Flow("all_gather", "world", world, 1, inv.trainable * 4, 1, "step", "updated parameters"),
    ]


def zero3_traffic(inv: ModelInventory, world: int, layout: Layout, st: StepSettings) -> list[Flow]:
    """DeepSpeed ZeRO-3 with fp32 parameters (our DeepSpeed config keeps them fp32).

    Parameters of at most ``zero3_persistence`` elements stay whole and are all-gathered once per
    step, after the optimizer. The others are gathered module by module: in forward and, when they
    were released, again in backward, on every micro-batch. Gradients are reduce-scattered after
    every micro-batch's backward.

    With ZeRO++ hpZ (``dp_replicate > 1``) a secondary copy of the parameters is partitioned inside
    each group of ``dp_shard`` ranks: the step's first gather reads the primary partition (all
    ranks), every later one the secondary (the group). A frozen parameter's secondary copy is never
    invalidated (DeepSpeed drops it only for what the optimizer updated), so it is always gathered
    from the group.
    """
    dims = group_dims(world, layout)
    n = world
    (s, s_stride), r = dims["dp_shard"], layout.mesh(world)[0]
    persistent = [p for p in inv.params if p.numel <= st.zero3_persistence]
    fetched = [p for p in inv.params if p.numel > st.zero3_persistence]
    m = st.accumulation
    passes = 2 if st.zero3_release else 1  # gathers per parameter per micro-batch
    modules = len({p.module for p in fetched})
    if st.zero3_prefetch_elements:
        modules = min(modules, max(1, math.ceil(sum(p.numel for p in fetched) / st.zero3_prefetch_elements)))
    flows = [Flow("reduce_scatter", "world", n, 1, inv.trainable * st.reduce_bytes * m, m, "backward", "gradients",
                  exposed_calls=m)]
    if persistent:
        flows.append(Flow("all_gather", "world", n, 1, sum(zero3_padded(p.numel, n) for p in persistent) * 4,
                          len(persistent), "step", "persistent parameters, after the step"))
    if r == 1:
        total = sum(zero3_padded(p.numel, n) for p in fetched) * 4
        flows.append(Flow("all_gather", "world", n, 1, total * m, modules * m, "forward", "parameters, forward",
                          exposed_calls=m))
        if passes == 2:
            flows.append(Flow("all_gather", "world", n, 1, total * m, modules * m, "backward", "parameters, backward",
                              exposed_calls=m))
        return flows
    trainable = sum(zero3_padded(p.numel, n) for p in fetched if p.trainable) * 4
    frozen_secondary = sum(zero3_padded(p.numel, s) for p in fetched if not p.trainable) * 4
    trainable_secondary = sum(zero3_padded(p.numel, s) for p in fetched if p.trainable) * 4
    gathers = passes * m  # per parameter per step; the first one of a trainable parameter is global
    flows.append(Flow("all_gather", "world", n, 1, trainable, modules, "forward", "parameters, primary (first gather)"))
    flows.append(Flow("all_gather", "dp_shard", s, s_stride, trainable_secondary * (gathers - 1)
                      + frozen_secondary * gathers, modules * (gathers - 1), "backward", "parameters, secondary (hpZ)"))
    return [f for f in flows if f.size > 1 and f.payload_bytes > 0]


def formula_traffic(inv: ModelInventory, world: int, layout: Layout, st: StepSettings) -> list[Flow]:
    """Every collective of one optimizer step of ``layout`` on ``world`` ranks, per rank.

    Not modelled: the all-reduce of the gradient norm (a few scalars; under 0.1% of the bytes of
    every measured strategy) and DeepSpeed's overflow check.
    """
    if layout.strategy == "ddp":
        return ddp_traffic(inv, world, st)
    if layout.strategy == "fsdp2":
        return fsdp2_traffic(inv, world, layout, st)
    if layout.strategy in ("zero1", "zero2"):
        return zero12_traffic(inv, world, int(layout.strategy[-1]), st)
    if layout.strategy == "zero3":
        return zero3_traffic(inv, world, layout, st)
    raise ValueError(f"no traffic formula for strategy {layout.strategy!r}")


def total_rank_bytes(flows: Iterable[Flow]) -> float:
    return sum(f.rank_bytes for f in flows)


def by_key(flows: Iterable[Flow]) -> dict[str, float]:
    """Bytes per rank per :func:`traffic_key` (the measured summary's keys)."""
    out: dict[str, float] = defaultdict(float)
    for f in flows:
        out[f.key] += f.rank_bytes
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Measured runs: the tiny model on 4 CPU ranks, one torchrun per case
# ---------------------------------------------------------------------------------------------

MEASURED_WORLD = 4
MEASURED_STEPS = 4  # steps 1-2 warm up (DDP rebuilds its buckets, DeepSpeed traces ZeRO-3's module order)
COUNTED_STEPS = (3, 4)

# The tests' tiny model (tests/runs.py), fp32 throughout. depth 2, width 64: every block
# parameter's dim 0 divides by 4 ranks; the root holds the rows FSDP2 pads (the 11-row label
# table, the 1-row frozen pos_embed), which the formula models exactly.
TINY_CONFIG: dict[str, Any] = {
    "model": {"size": "custom", "depth": 2, "hidden_size": 64, "num_heads": 4, "input_size": 8, "in_channels": 16,
              "semantic_channels": 4, "num_classes": 10, "repa_projector_dim": 32, "repa_feature_dim": 32},
    "data": {"path": "synthetic", "num_workers": 0},
    "train": {"max_steps": MEASURED_STEPS, "global_batch_size": 16, "mixed_precision": "fp32", "log_every": 1000,
              "sample_every": 0, "ema_decay": 0.9},
    "optimizer": {"lr": 1.0e-3, "warmup_steps": 2},
    "parallel": {"strategy": "fsdp2", "param_dtype": "fp32", "reduce_dtype": "fp32"},
    "checkpoint": {"every": 0, "keep": 1},
    "run": {"device": "cpu", "wandb_mode": "disabled"},
}

# ZeRO-3 releasing parameters module by module (what ZeRO-3 is for): no reuse across modules, no
# prefetch that would keep the next use alive, and only the small parameters persistent (1000
# elements: the tiny model's norms and biases; XL's and XXL's stay below the default 1e5).
ZERO3_PER_LAYER = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                   "stage3_param_persistence_threshold": 1000}


@dataclass(frozen=True)
class MeasuredCase:
    """One measured run: a layout and the config keys it needs besides the tiny config.

    ``accumulation`` > 1 sets ``train.micro_batch_size`` so that each step has that many micro-batches
    (the formulas' per-micro-batch terms are then checked too).
    """

    label: str
    layout: Layout
    accumulation: int = 1
    deepspeed: dict = field(default_factory=dict)
    needs: str = ""  # why it may not run yet (a config key still being built)


MEASURED_CASES = (
    MeasuredCase("ddp, 2 micro-batches", Layout("ddp"), accumulation=2),
    MeasuredCase("fsdp2", Layout("fsdp2")),
    MeasuredCase("hsdp 2x2, 2 micro-batches", Layout("fsdp2", 2, 2), accumulation=2),
    MeasuredCase("zero1, 2 micro-batches", Layout("zero1"), accumulation=2),
    MeasuredCase("zero2, 2 micro-batches", Layout("zero2"), accumulation=2),
    MeasuredCase("zero3 (DeepSpeed defaults)", Layout("zero3")),
    MeasuredCase("zero3 per-layer", Layout("zero3"), deepspeed=ZERO3_PER_LAYER),
    MeasuredCase("zero3-hpz 2x2 per-layer", Layout("zero3", 2, 2), deepspeed=ZERO3_PER_LAYER,
                 needs="zero3 with parallel.dp_replicate (ZeRO++ hpZ)"),
    MeasuredCase("fsdp2+tp2 (2 shards x 2)", Layout("fsdp2", 1, 2, 2), needs="parallel.tp"),
)


def case_config(case: MeasuredCase) -> dict[str, Any]:
    """The full config dict of a measured case."""
    config = json.loads(json.dumps(TINY_CONFIG))
    r, s, t = case.layout.mesh(MEASURED_WORLD)
    if case.accumulation > 1:
        config["train"]["micro_batch_size"] = config["train"]["global_batch_size"] // (r * s * case.accumulation)
    if case.deepspeed:
        config["parallel"]["deepspeed"] = {"zero_optimization": dict(case.deepspeed)}
    return config


def settings_from_config(config, world: int, layout: Layout, model_numel: int) -> StepSettings:
    """The :class:`StepSettings` a resolved :class:`sfd_train.config.Config` gives on ``world`` ranks.

    Reads the values the run itself uses, so that the formula and the run cannot disagree on them.
    """
    bytes_of = {"fp32": 4, "bf16": 2}
    r, s, _ = layout.mesh(world)
    data_ranks = r * s
    train = config.train
    micro = train.micro_batch_size or train.global_batch_size // data_ranks
    zero = dict(config.parallel.deepspeed.get("zero_optimization", {}))
    reuse = zero.get("stage3_max_reuse_distance", 1_000_000_000)
    prefetch = zero.get("stage3_prefetch_bucket_size", 50_000_000)
    return StepSettings(
        zero3_prefetch_elements=prefetch,
        micro_batch=micro,
        accumulation=train.global_batch_size // (micro * data_ranks),
        param_bytes=bytes_of[config.parallel.param_dtype],
        reduce_bytes=bytes_of[config.parallel.reduce_dtype],
        activation_bytes=2 if train.mixed_precision == "bf16" else 4,
        reshard_after_forward=config.parallel.reshard_after_forward,
        zero3_persistence=zero.get("stage3_param_persistence_threshold", 100_000),
        # DeepSpeed keeps a parameter gathered when its next use is within the reuse distance and the
        # prefetcher already holds it: for a model smaller than both, nothing is released.
        zero3_release=not (reuse >= model_numel and prefetch >= model_numel),
    )


def launch_measured_run(case: MeasuredCase, work: Path, timeout: float = 600) -> dict[str, Any]:
    """Runs one 4-rank training under torchrun with the counting worker; returns the ranks' counts.

    Raises:
        RuntimeError: the run failed (its output is in the message).
    """
    import shutil

    import yaml

    shutil.rmtree(work, ignore_errors=True)  # a run folder with a checkpoint would be resumed, not trained
    work.mkdir(parents=True)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(case_config(case)))
    counts = work / "counts"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(MEASURED_WORLD),
               "--master-port", str(_free_port()), str(Path(__file__).resolve()), "_worker",
               "--steps", f"{COUNTED_STEPS[0]}:{COUNTED_STEPS[1]}", "--counts", str(counts), "--",
               str(config_path), f"run.output_dir={work / 'run'}", *case.layout.overrides()]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.label}: the run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(MEASURED_WORLD)]
    return {"ranks": ranks, "wall_s": time.time() - started}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measured_per_step(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The counted steps of all ranks reduced to one per-rank, per-step summary.

    Every rank must have counted every step, and the steps must agree with each other (a steady
    state); ranks may differ slightly (e.g. which rank roots a reduce), so the busiest rank is kept.

    Raises:
        RuntimeError: a rank counted no step, or two counted steps of one rank differ.
    """
    per_rank = []
    for rank in ranks:
        steps = rank["steps"]
        if len(steps) != COUNTED_STEPS[1] - COUNTED_STEPS[0] + 1:
            raise RuntimeError(f"rank {rank['rank']} counted steps {sorted(steps)}, expected {COUNTED_STEPS}")
        summaries = [s["summary"] for s in steps.values()]
        if any(s != summaries[0] for s in summaries[1:]):
            raise RuntimeError(f"rank {rank['rank']}: the counted steps differ (no steady state): {summaries}")
        per_rank.append((sum(v["rank_bytes"] for v in summaries[0].values()), summaries[0], next(iter(steps.values()))))
    total, summary, first = max(per_rank, key=lambda item: item[0])
    return {"summary": summary, "rank_bytes": total, "micro_batch": first["micro_batch"],
            "accumulation": first["accumulation"],
            "ranks_equal": all(item[1] == per_rank[0][1] for item in per_rank)}


def compare_case(case: MeasuredCase, measured: dict[str, Any], inv: ModelInventory) -> dict[str, Any]:
    """Measured bytes per rank next to the formula's, in total and per collective and group."""
    from sfd_train.config import build_config

    config = build_config(case_config(case), _layout_dict(case.layout))
    settings = settings_from_config(config, MEASURED_WORLD, case.layout, inv.total)
    if (settings.micro_batch, settings.accumulation) != (measured["micro_batch"], measured["accumulation"]):
        raise RuntimeError(f"{case.label}: the run used micro-batch {measured['micro_batch']} x "
                           f"{measured['accumulation']}, the formula assumed {settings.micro_batch} x "
                           f"{settings.accumulation}")
    flows = formula_traffic(inv, MEASURED_WORLD, case.layout, settings)
    formula = total_rank_bytes(flows)
    return {
        "label": case.label,
        "layout": case.layout.name,
        "settings": asdict(settings),
        "measured_bytes": measured["rank_bytes"],
        "ranks_equal": measured["ranks_equal"],
        "formula_bytes": formula,
        "relative_error": (formula - measured["rank_bytes"]) / measured["rank_bytes"],
        "measured_by_key": {k: v["rank_bytes"] for k, v in measured["summary"].items()},
        "measured_calls": {k: v["calls"] for k, v in measured["summary"].items()},
        "formula_by_key": by_key(flows),
        "formula_flows": [asdict(f) | {"rank_bytes": f.rank_bytes} for f in flows],
    }


def _layout_dict(layout: Layout) -> dict[str, Any]:
    parallel: dict[str, Any] = {"strategy": layout.strategy}
    if layout.dp_replicate > 1 or layout.dp_shard != -1:
        parallel.update(dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard)
    if layout.tp > 1:
        parallel["tp"] = layout.tp
    return {"parallel": parallel}


def case_supported(case: MeasuredCase) -> str | None:
    """None when the config accepts the case's layout; otherwise the config error (not built yet)."""
    from sfd_train.config import ConfigError, build_config

    try:
        build_config(case_config(case), _layout_dict(case.layout)).parallel.check_world_size(MEASURED_WORLD)
    except ConfigError as err:
        return str(err)
    return None


def tiny_inventory() -> ModelInventory:
    from sfd_train.config import build_config

    return inventory_of(build_config(TINY_CONFIG).model, "tiny (tests/runs.py)")


def run_measurements(cases: Iterable[MeasuredCase], work: Path, log=print) -> dict[str, Any]:
    """Runs every supported case, compares it with its formula; returns the report (see measure mode)."""
    inv = tiny_inventory()
    results, skipped = [], []
    for case in cases:
        reason = case_supported(case)
        if reason is not None:
            skipped.append({"label": case.label, "reason": reason})
            log(f"  {case.label:34s} skipped: {reason}")
            continue
        run = launch_measured_run(case, work / _slug(case.label))
        result = compare_case(case, measured_per_step(run["ranks"]), inv)
        result["wall_s"] = round(run["wall_s"], 1)
        results.append(result)
        log(f"  {case.label:34s} measured {result['measured_bytes'] / 1e6:8.4f} MB  formula "
            f"{result['formula_bytes'] / 1e6:8.4f} MB  error {100 * result['relative_error']:+6.2f}%  "
            f"({result['wall_s']:.0f} s)")
    return {
        "model": {"name": inv.name, "parameters": inv.total, "trainable": inv.trainable, "buffers": inv.buffer_numel},
        "world_size": MEASURED_WORLD,
        "counted_steps": list(COUNTED_STEPS),
        "convention": "bytes each rank sends per optimizer step with ring algorithms: payload x "
                      "(2(n-1)/n all-reduce, (n-1)/n all-gather / reduce-scatter, 1 broadcast / reduce)",
        "cases": results,
        "skipped": skipped,
    }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")



# ---------------------------------------------------------------------------------------------
# Hardware: the figures the projection uses, each with where it comes from
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """A cluster of identical nodes.

    Bandwidths are per device and per direction: ``intra`` the device's share of the node's
    fabric (NVLink/NVSwitch, HCCS), ``inter`` its own NIC (one per device, rail-optimised).
    """

    key: str
    name: str
    devices_per_node: int
    peak_flops: float
    hbm_bytes_per_s: float
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    memory_gib: float
    sources: tuple[tuple[str, str], ...]


H100_PAGE = "https://www.nvidia.com/en-us/data-center/h100/"
H200_PAGE = "https://www.nvidia.com/en-us/data-center/h200/"
HGX_RA = "https://docs.nvidia.com/reference-architectures/hgx-ai-factory-h100-h200-b200/abstract.md"
ATLAS_800T_A2 = "https://support.huawei.com/enterprise/zh/doc/EDDOC1100317202/f3dba488"
ASCEND_SERVERS = "https://www.hiascend.com/hardware/ai-server"
ASCEND_NPU_PORTS = "https://www.hiascend.com/document/detail/zh/mindcluster/730/deployer/deployerug/deployer_0025.html"

CLUSTERS = {
    "h100": Cluster(
        "h100", "H100 SXM (HGX/DGX, 8 per node)", 8, 989e12, 3.35e12, 450e9, 50e9, 80,
        (("dense BF16 989 TFLOP/s (1,979 with sparsity), HBM3 3.35 TB/s, NVLink 900 GB/s", H100_PAGE),
         ("8 GPUs per node, one 400 Gb/s NIC per GPU (2-8-9-400)", HGX_RA)),
    ),
    "h200": Cluster(
        "h200", "H200 SXM (HGX, 8 per node)", 8, 989e12, 4.8e12, 450e9, 50e9, 141,
        (("dense BF16 989 TFLOP/s (1,979 with sparsity), HBM3e 4.8 TB/s, NVLink 900 GB/s", H200_PAGE),
         ("8 GPUs per node, one 400 Gb/s NIC per GPU (2-8-9-400)", HGX_RA)),
    ),
    "910b": Cluster(
        "910b", "Ascend 910B (Atlas 800T A2, 8 per node)", 8, 376e12, 1.6e12, 196e9, 25e9, 64,
        (("8 NPUs, HCCS full mesh 392 GB/s per NPU (7 links x 56 GB/s), 8 x 200GE RoCE", ATLAS_800T_A2),
         ("one parameter-plane RoCE port per NPU, 8 per node", ASCEND_NPU_PORTS),
         ("FP16/BF16 dense 376 TFLOP/s (910B2; 313-414 across 910B SKUs), HBM2e 64 GB ~1.6 TB/s", ASCEND_SERVERS)),
    ),
}


@dataclass(frozen=True)
class Assumptions:
    """What the projection assumes besides the hardware figures (docs/scaling.md discusses each).

    Attributes:
        mfu: model FLOPs utilisation of the forward and backward (the FLOPs of
            ``training_flops_per_image`` over the step's compute time, optimizer excluded).
        link_efficiency: achieved bus bandwidth over the link rate (NCCL/HCCL on large messages).
        intra_hop_s, inter_hop_s: latency of one ring step inside a node and across nodes.
        optimizer_bytes_per_param: HBM traffic of fused AdamW (reads p, g, m, v; writes p, m, v: 28 B)
            plus the EMA lerp (12 B) per parameter a rank steps.
        max_micro_batch: images per device per forward (what fits next to XL/XXL activations on 64-80 GB;
            XL/1 trains at 32 per H100 in bench_step); more images per step become accumulation.
        weak_batch_per_device: images per device per step in weak scaling (the recipe's 256 on 8).
    """

    mfu: float = 0.40
    link_efficiency: float = 0.80
    intra_hop_s: float = 1e-6
    inter_hop_s: float = 8e-6
    optimizer_bytes_per_param: float = 40.0
    max_micro_batch: int = 32
    weak_batch_per_device: int = 32


def flow_seconds(flow: Flow, cluster: Cluster, a: Assumptions) -> tuple[float, float]:
    """``(seconds on the intra-node links, seconds on the inter-node links)`` of one flow.

    A group inside one node runs over NVLink/HCCS. A group spanning nodes runs a ring (all-gather,
    reduce-scatter) or a tree (all-reduce) whose bytes per rank cross the node boundary: with ``g``
    of its ranks in a node, NCCL/HCCL drive one ring per NIC, so the node's ``g`` NICs carry them
    together (``g`` = 8 for a flat group, 1 for an HSDP replica group). Latency: every ring step
    costs one hop; the steps between nodes cost an inter-node hop.
    """
    node = cluster.devices_per_node
    per_node = min(flow.size, max(1, node // flow.stride))
    nodes = math.ceil(flow.size / per_node)
    eff = a.link_efficiency
    hops_intra, hops_inter = _hops(flow.kind, flow.size, nodes)
    latency = flow.calls * (hops_intra * a.intra_hop_s + hops_inter * a.inter_hop_s)
    if nodes == 1:
        return flow.rank_bytes / (cluster.intra_bytes_per_s * eff) + latency, 0.0
    inter = flow.rank_bytes / (per_node * cluster.inter_bytes_per_s * eff) + latency
    intra = flow.rank_bytes / (cluster.intra_bytes_per_s * eff) if per_node > 1 else 0.0
    return intra, inter


def _hops(kind: str, n: int, nodes: int) -> tuple[int, int]:
    """Sequential steps of one collective, ``(inside nodes, between nodes)``."""
    if n <= 1:
        return 0, 0
    if kind == "all_reduce":
        if nodes == 1:
            return 2 * (n - 1), 0
        return 2 * (n // nodes - 1), 2 * math.ceil(math.log2(nodes))  # NCCL's tree across nodes
    return n - nodes, nodes - 1 if nodes > 1 else 0


# ---------------------------------------------------------------------------------------------
# Projection: step time and scaling efficiency
# ---------------------------------------------------------------------------------------------

MODEL_SIZES_PROJECTED = ("XL", "XXL")
DEVICE_COUNTS = (8, 64, 256, 1024)
SCENARIOS = ("weak", "strong-256", "strong-1024")


def projected_model_config(size: str):
    """The published XL/1 or XXL/1 configuration: 16x16 latent (256 tokens), 32 texture + 16 semantic
    channels, REPA projector on."""
    from sfd_train.config.schema import ModelConfig

    return ModelConfig(size=size, patch_size=1, input_size=16, in_channels=48, semantic_channels=16, use_repa=True)


@dataclass(frozen=True)
class Family:
    """A layout rule that scales with the device count (one row of the projection table)."""

    name: str
    strategy: str
    mesh: str  # "flat", "node" (shard inside a node, replicate across nodes)
    tp: int = 1
    reduce_bytes: int = 4  # parallel.reduce_dtype: fp32 (the default) or bf16
    reshard_after_forward: bool = True  # parallel.reshard_after_forward

    def layout(self, devices: int, node: int) -> Layout:
        if self.mesh == "flat":
            return Layout(self.strategy)
        inside = min(devices, node)
        return Layout(self.strategy, max(1, devices // node), inside // self.tp, self.tp)


FAMILIES = (
    Family("ddp", "ddp", "flat"),
    Family("zero1", "zero1", "flat"),
    Family("zero2", "zero2", "flat"),
    Family("zero3", "zero3", "flat"),
    Family("fsdp2", "fsdp2", "flat"),
    Family("hsdp", "fsdp2", "node"),
    Family("hsdp+bf16", "fsdp2", "node", reduce_bytes=2),
    Family("hsdp+bf16+keep", "fsdp2", "node", reduce_bytes=2, reshard_after_forward=False),
    Family("zero3-hpz", "zero3", "node"),
    Family("hsdp+tp2", "fsdp2", "node", tp=2),
    Family("hsdp+tp4", "fsdp2", "node", tp=4),
    Family("hsdp+tp8", "fsdp2", "node", tp=8),
)


def global_batch(scenario: str, devices: int, a: Assumptions) -> int:
    return a.weak_batch_per_device * devices if scenario == "weak" else int(scenario.split("-")[1])


def split_batch(images: int, a: Assumptions) -> tuple[int, int]:
    """``(micro-batch, accumulation)`` for ``images`` per data-parallel rank per step: the fewest
    micro-batches of at most ``max_micro_batch`` that divide the images evenly."""
    for steps in range(math.ceil(images / a.max_micro_batch), images + 1):
        if images % steps == 0:
            return images // steps, steps
    return 1, images


def optimizer_params_per_rank(inv: ModelInventory, layout: Layout, world: int) -> float:
    """Parameters whose AdamW and EMA update a rank runs (its shard, or everything under DDP)."""
    r, s, t = layout.mesh(world)
    if layout.strategy == "ddp":
        return inv.trainable
    if layout.strategy == "fsdp2":
        return sum(fsdp_padded(p.tp_shape(t), s) for p in inv.params if p.trainable) / s
    return inv.trainable / world


def project_one(inv: ModelInventory, cluster: Cluster, family: Family, devices: int, scenario: str,
                a: Assumptions) -> dict[str, Any]:
    """Step time and efficiency of one family on ``devices`` devices; ``feasible`` False with a reason
    when the layout does not fit (batch, heads, mesh)."""
    layout = family.layout(devices, cluster.devices_per_node)
    row: dict[str, Any] = {"cluster": cluster.key, "model": inv.name, "scenario": scenario, "devices": devices,
                           "family": family.name, "layout": layout.name}
    batch = global_batch(scenario, devices, a)
    try:
        r, s, t = layout.mesh(devices)
    except ValueError as err:
        return row | {"feasible": False, "reason": str(err)}
    data_ranks = r * s
    if inv.heads % t or batch % data_ranks:
        why = (f"{inv.heads} heads do not split over tp {t}" if inv.heads % t
               else f"global batch {batch} does not split over {data_ranks} data-parallel ranks")
        return row | {"feasible": False, "reason": why}
    micro, accumulation = split_batch(batch // data_ranks, a)
    settings = StepSettings(micro_batch=micro, accumulation=accumulation,
                            param_bytes=2 if layout.strategy == "fsdp2" else 4,
                            reduce_bytes=family.reduce_bytes, activation_bytes=2,
                            reshard_after_forward=family.reshard_after_forward)
    flows = formula_traffic(inv, devices, layout, settings)
    compute_s = (batch / data_ranks) * inv.flops_per_image / (t * cluster.peak_flops * a.mfu)
    optimizer_s = a.optimizer_bytes_per_param * optimizer_params_per_rank(inv, layout, devices) / cluster.hbm_bytes_per_s
    timing = step_timing(flows, compute_s, optimizer_s, cluster, a)
    ideal_s = batch * inv.flops_per_image / (devices * cluster.peak_flops * a.mfu)
    intra_bytes = sum(f.rank_bytes for f in flows if flow_seconds(f, cluster, a)[1] == 0)
    return row | {
        "feasible": True, "global_batch": batch, "micro_batch": micro, "accumulation": accumulation,
        "tokens_per_micro_batch": micro * inv.tokens, "bytes_per_rank": total_rank_bytes(flows),
        "bytes_in_node": intra_bytes, "bytes_across_nodes": total_rank_bytes(flows) - intra_bytes,
        "compute_s": compute_s, "optimizer_s": optimizer_s, **timing,
        "ideal_s": ideal_s, "efficiency": ideal_s / timing["step_s"],
        "images_per_s": batch / timing["step_s"],
    }


def step_timing(flows: list[Flow], compute_s: float, optimizer_s: float, cluster: Cluster,
                a: Assumptions) -> dict[str, float]:
    """The overlap model (docs/scaling.md, "Overlap"): per pass, compute and each link work in
    parallel, so a pass takes the longest of them, plus the calls that cannot overlap (the first
    gather, the last reduction). Tensor-parallel all-reduces sit inside the compute. After the
    backward come the optimizer, the EMA and the step-phase collectives, in sequence."""
    passes = {"forward": compute_s / 3, "backward": 2 * compute_s / 3}
    for f in flows:
        if f.phase == "inline":
            intra, inter = flow_seconds(f, cluster, a)
            passes["forward" if "forward" in f.what else "backward"] += max(intra, inter)
    out = {}
    for name, compute in passes.items():
        phase = [f for f in flows if f.phase == name]
        times = [flow_seconds(f, cluster, a) for f in phase]
        intra = sum(t[0] for t in times)
        inter = sum(t[1] for t in times)
        edge = sum(max(t) * f.exposed_calls / f.calls for f, t in zip(phase, times) if f.calls)
        out[f"{name}_s"] = max(compute, intra, inter) + edge
        out[f"{name}_link_s"] = max(intra, inter)
    after = sum(max(flow_seconds(f, cluster, a)) for f in flows if f.phase == "step")
    out["after_backward_s"] = optimizer_s + after
    out["step_s"] = out["forward_s"] + out["backward_s"] + out["after_backward_s"]
    return out


def project_all(a: Assumptions, clusters: Iterable[str] = tuple(CLUSTERS), log=print) -> dict[str, Any]:
    """Every family x device count x scenario x model x cluster."""
    rows = []
    models = {}
    for size in MODEL_SIZES_PROJECTED:
        inv = inventory_of(projected_model_config(size), size)
        models[size] = {"parameters": inv.total, "trainable": inv.trainable, "depth": inv.depth,
                        "hidden": inv.hidden, "heads": inv.heads, "tokens": inv.tokens,
                        "flops_per_image": inv.flops_per_image}
        for key in clusters:
            for scenario in SCENARIOS:
                for devices in DEVICE_COUNTS:
                    for family in FAMILIES:
                        rows.append(project_one(inv, CLUSTERS[key], family, devices, scenario, a))
    log(f"  {len(rows)} layouts projected")
    return {"assumptions": asdict(a), "models": models,
            "clusters": {k: asdict(CLUSTERS[k]) for k in clusters}, "rows": rows}


def best_row(rows: list[dict[str, Any]], cluster: str, model: str, scenario: str, devices: int,
             families: Iterable[str] | None = None) -> dict[str, Any] | None:
    """The feasible row with the shortest step (highest throughput) for one job."""
    allowed = set(families) if families is not None else None
    candidates = [r for r in rows if r["feasible"] and (r["cluster"], r["model"], r["scenario"], r["devices"])
                  == (cluster, model, scenario, devices) and (allowed is None or r["family"] in allowed)]
    return min(candidates, key=lambda r: r["step_s"]) if candidates else None


def recommended_family(scenario: str, devices: int, a: Assumptions) -> str:
    """The layout rule docs/scaling.md recommends (and README repeats) for a job.

    Shard inside a node, replicate across nodes (HSDP; on one node that is plain FSDP2). When each
    device gets fewer than 16 images per step the step is too short to hide the gradient exchange:
    reduce in bf16. Only when the global batch is smaller than the device count, split samples with
    tensor parallelism (the smallest degree that gives every data-parallel rank an image).
    """
    batch = global_batch(scenario, devices, a)
    if batch < devices:
        tp = next(t for t in (2, 4, 8) if batch * t >= devices)
        return f"hsdp+tp{tp}"
    return "hsdp+bf16" if batch / devices < 16 else "hsdp"


def recommendation_rows(projection: dict[str, Any], a: Assumptions) -> list[dict[str, Any]]:
    """Per job: the recommended layout's projection next to the fastest one's."""
    out = []
    for cluster in projection["clusters"]:
        for model in MODEL_SIZES_PROJECTED:
            for scenario in SCENARIOS:
                for devices in DEVICE_COUNTS:
                    family = recommended_family(scenario, devices, a)
                    mine = best_row(projection["rows"], cluster, model, scenario, devices, families=[family])
                    best = best_row(projection["rows"], cluster, model, scenario, devices)
                    out.append({"cluster": cluster, "model": model, "scenario": scenario, "devices": devices,
                                "recommended": mine, "fastest": best})
    return out


def recommendation_table(projection: dict[str, Any], a: Assumptions, cluster: str) -> str:
    """Markdown: the recommended layout of every job, its step and efficiency, and the fastest one."""
    lines = ["| model | job | devices | recommended | mesh | micro-batch x accum. | step | images/s | efficiency | "
             "fastest (efficiency) |", "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for item in recommendation_rows(projection, a):
        if item["cluster"] != cluster:
            continue
        mine, best = item["recommended"], item["fastest"]
        job = {"weak": f"weak, {a.weak_batch_per_device}/device", "strong-256": "batch 256",
               "strong-1024": "batch 1024"}[item["scenario"]]
        if mine is None:
            lines.append(f"| {item['model']} | {job} | {item['devices']} | - | | | | | | |")
            continue
        lines.append(
            f"| {item['model']} | {job} | {item['devices']} | {mine['family']} | {mine['layout']} | "
            f"{mine['micro_batch']} x {mine['accumulation']} | {1e3 * mine['step_s']:.0f} ms | "
            f"{mine['images_per_s']:,.0f} | {100 * mine['efficiency']:.0f}% | "
            f"{best['family']} ({100 * best['efficiency']:.0f}%) |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reports: tables and the plot
# ---------------------------------------------------------------------------------------------

def measured_table(report: dict[str, Any]) -> str:
    """Markdown: measured vs formula bytes per rank per step, per case and per collective."""
    lines = ["| case | collective @ ranks/stride | measured (bytes/rank/step) | formula | error |",
             "|---|---|---:|---:|---:|"]
    for case in report["cases"]:
        keys = sorted(set(case["measured_by_key"]) | set(case["formula_by_key"]))
        for key in keys:
            measured, formula = case["measured_by_key"].get(key, 0.0), case["formula_by_key"].get(key, 0.0)
            if not formula and measured < 1024:
                error = "not modelled (gradient-norm scalars)"
            else:
                error = f"{100 * (formula - measured) / measured:+.2f}%" if measured else "n/a"
            lines.append(f"| {case['label']} | {key} | {measured:,.0f} | {formula:,.0f} | {error} |")
        lines.append(f"| **{case['label']}** | **total** | **{case['measured_bytes']:,.0f}** | "
                     f"**{case['formula_bytes']:,.0f}** | **{100 * case['relative_error']:+.2f}%** |")
    for skipped in report.get("skipped", []):
        lines.append(f"| {skipped['label']} | not run: {skipped['reason']} | | | |")
    return "\n".join(lines)


def projection_table(projection: dict[str, Any], cluster: str, model: str) -> str:
    """Markdown: efficiency (and step time) of every family, one column per scenario x device count."""
    rows = [r for r in projection["rows"] if r["cluster"] == cluster and r["model"] == model]
    header = ["layout"] + [f"{_scenario_label(s)} {n}" for s in SCENARIOS for n in DEVICE_COUNTS]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for family in FAMILIES:
        cells = [family.name]
        for scenario in SCENARIOS:
            for devices in DEVICE_COUNTS:
                row = next(r for r in rows if (r["family"], r["scenario"], r["devices"]) ==
                           (family.name, scenario, devices))
                cells.append(f"{100 * row['efficiency']:.0f}% {1e3 * row['step_s']:.0f} ms" if row["feasible"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    best = ["**best**"]
    for scenario in SCENARIOS:
        for devices in DEVICE_COUNTS:
            row = best_row(projection["rows"], cluster, model, scenario, devices)
            best.append(f"**{row['family']}**" if row else "-")
    lines.append("| " + " | ".join(best) + " |")
    return "\n".join(lines)


def _scenario_label(scenario: str) -> str:
    return {"weak": "weak", "strong-256": "B=256", "strong-1024": "B=1024"}[scenario]


def save_plot(projection: dict[str, Any], path: Path) -> Path:
    """Efficiency against devices: rows XL/XXL on H100 and 910B, columns the three scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, m) for c in ("h100", "910b") for m in MODEL_SIZES_PROJECTED]
    shown = ("ddp", "zero2", "zero3", "fsdp2", "hsdp", "hsdp+bf16", "zero3-hpz", "hsdp+tp2", "hsdp+tp8")
    fig, axes = plt.subplots(len(panels), len(SCENARIOS), figsize=(15, 3.2 * len(panels)), sharex=True, sharey=True)
    for i, (cluster, model) in enumerate(panels):
        for j, scenario in enumerate(SCENARIOS):
            ax = axes[i][j]
            for family in shown:
                points = [(r["devices"], r["efficiency"]) for r in projection["rows"] if r["feasible"] and
                          (r["cluster"], r["model"], r["scenario"], r["family"]) == (cluster, model, scenario, family)]
                if points:  # dashed: hpZ lies on top of zero3
                    ax.plot(*zip(*points), marker="o", label=family, linewidth=2.2 if family.startswith("hsdp") else 1,
                            linestyle="--" if family == "zero3-hpz" else "-")
            ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_xticks(DEVICE_COUNTS, [str(n) for n in DEVICE_COUNTS])
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{model} on {CLUSTERS[cluster].name.split(' (')[0]}, {_scenario_label(scenario)}", fontsize=9)
            if j == 0:
                ax.set_ylabel("scaling efficiency")
            if i == len(panels) - 1:
                ax.set_xlabel("devices")
    axes[0][0].legend(fontsize=7, loc="lower left")
    mfu = projection["assumptions"]["mfu"]
    fig.suptitle(f"Projected scaling efficiency (ideal = model FLOPs at {100 * mfu:.0f}% MFU; weak: "
                 f"{projection['assumptions']['weak_batch_per_device']} images/device)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def measure_mode(args) -> int:
    cases = [c for c in MEASURED_CASES if not args.cases or any(c.label.startswith(x) for x in args.cases)]
    print(f"measure: {len(cases)} cases, {MEASURED_WORLD} CPU ranks each, steps {COUNTED_STEPS[0]}-"
          f"{COUNTED_STEPS[1]} counted")
    with tempfile.TemporaryDirectory(prefix="scaling_model_") as work:
        report = run_measurements(cases, Path(work))
    print(measured_table(report))
    worst = max((abs(c["relative_error"]) for c in report["cases"]), default=0.0)
    report["max_abs_relative_error"] = worst
    _write_json(report, args.out / "measured.json")
    print(f"largest |error|: {100 * worst:.2f}% (limit {100 * args.tolerance:.0f}%) -> {args.out / 'measured.json'}")
    return 0 if worst <= args.tolerance else 1


def project_mode(args) -> int:
    a = Assumptions(mfu=args.mfu, link_efficiency=args.link_efficiency, intra_hop_s=args.intra_hop_us * 1e-6,
                    inter_hop_s=args.inter_hop_us * 1e-6)
    print(f"project: XL and XXL at {', '.join(map(str, DEVICE_COUNTS))} devices, MFU {100 * a.mfu:.0f}%, links at "
          f"{100 * a.link_efficiency:.0f}% of their rate")
    projection = project_all(a)
    text = []
    for cluster in CLUSTERS:
        text.append(f"### Recommended layouts on {CLUSTERS[cluster].name}\n\n"
                    f"{recommendation_table(projection, a, cluster)}\n")
    for cluster in CLUSTERS:
        for model in MODEL_SIZES_PROJECTED:
            text.append(f"### {model} on {CLUSTERS[cluster].name}: every layout (efficiency, step time)\n\n"
                        f"{projection_table(projection, cluster, model)}\n")
    markdown = "\n".join(text)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.md").write_text(markdown)
    projection["recommended"] = {f"{r['cluster']}/{r['model']}/{r['scenario']}/{r['devices']}":
                                 (r["recommended"] or {}).get("family") for r in recommendation_rows(projection, a)}
    _write_json(projection, args.out / "projection.json")
    plot = save_plot(projection, args.out / "scaling.png")
    print(f"-> {args.out / 'projection.json'}, {args.out / 'projection.md'}, {plot}")
    return 0


def _write_json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _rounded(data)
    if isinstance(data, dict) and "rows" in data:  # one projection row per line
        head = json.dumps({k: v for k, v in data.items() if k != "rows"}, indent=1)[:-2]
        rows = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in data["rows"])
        path.write_text(f'{head},\n "rows": [\n  {rows}\n ]\n}}\n')
    else:
        path.write_text(json.dumps(data, indent=1) + "\n")


def _rounded(value: Any) -> Any:
    """Whole floats (byte counts) to ints, other floats to 6 significant digits (the committed JSON
    stays small and its diffs readable)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/scaling_model.py",
        description="Bytes per rank per optimizer step of every collective, measured on real 4-rank CPU runs and "
        "checked against closed-form formulas (measure), then projected to step time and scaling efficiency of "
        "XL/1 and XXL/1 on H100/H200 and Ascend 910B clusters (project). Without a mode: both. "
        "docs/scaling.md explains the method and the numbers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python benchmarks/scaling_model.py                      # both (a few minutes on 2 cores)\n"
        "  python benchmarks/scaling_model.py measure --cases ddp fsdp2\n"
        "  python benchmarks/scaling_model.py project --mfu 0.35 --out /tmp/scaling\n"
        "exit code 1: a measured strategy disagrees with its formula by more than --tolerance",
    )
    parser.add_argument("mode", nargs="?", choices=("measure", "project", "all"), default="all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--cases", nargs="*", default=None, metavar="LABEL",
                        help="measure only the cases whose label starts with one of these (labels: "
                        + ", ".join(c.label for c in MEASURED_CASES) + ")")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest accepted |formula/measured - 1|")
    parser.add_argument("--mfu", type=float, default=Assumptions.mfu, help="MFU of forward+backward (default 0.40)")
    parser.add_argument("--link-efficiency", type=float, default=Assumptions.link_efficiency,
                        help="achieved share of every link's rate (default 0.80)")
    parser.add_argument("--intra-hop-us", type=float, default=Assumptions.intra_hop_s * 1e6,
                        help="latency of one ring step inside a node, microseconds (default 1)")
    parser.add_argument("--inter-hop-us", type=float, default=Assumptions.inter_hop_s * 1e6,
                        help="latency of one ring or tree step between nodes, microseconds (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":  # one rank of a measured run (started by launch_measured_run)
        worker = argparse.ArgumentParser(prog="scaling_model.py _worker")
        worker.add_argument("--steps", required=True)
        worker.add_argument("--counts", type=Path, required=True)
        worker.add_argument("train_argv", nargs=argparse.REMAINDER)
        args = worker.parse_args(argv[1:])
        first, last = (int(v) for v in args.steps.split(":"))
        rest = args.train_argv[1:] if args.train_argv[:1] == ["--"] else args.train_argv
        return run_worker(first, last, args.counts, rest)
    args = build_parser().parse_args(argv)
    code = 0
    if args.mode in ("measure", "all"):
        code = measure_mode(args)
    if args.mode in ("project", "all"):
        code = project_mode(args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())
