"""The scaling model's formulas: what every collective of an optimizer step moves, and how long it takes.

Moved here from ``benchmarks/scaling_model.py`` so that the planner (:mod:`sfd_train.planning`)
and the benchmark share one implementation. The benchmark measures the byte counts on real
multi-rank runs and checks these formulas against them (docs/scaling.md); the planner puts the
same formulas, a stated MFU and the links of a cluster together into a step time.

Bytes convention: for every collective the *payload* S is the bytes of the full tensor (the
all-reduced tensor, the gathered output, the reduce-scattered input, the broadcast tensor); each
rank sends S x f(n) with ring algorithms on n ranks: all-reduce 2(n-1)/n, all-gather and
reduce-scatter (n-1)/n, broadcast and reduce 1 (nccl-tests' "bus bandwidth" factors). The time of a
collective is bytes-per-rank / link bandwidth.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable



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


def traffic_key(kind: str, size: int, stride: int) -> str:
    """``"all_gather@4/1"``: the kind, the group size and its stride (one mesh dimension)."""
    return f"{kind}@{size}/{stride}"


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
A100_DATASHEET = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
DGX_A100_GUIDE = "https://docs.nvidia.com/dgx/dgxa100-user-guide/introduction-to-dgxa100.html"

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
    # Used by the planner only (the benchmark projects the three clusters above).
    "a100-40g": Cluster(
        "a100-40g", "A100 SXM4 40GB (HGX/DGX A100, 8 per node)", 8, 312e12, 1.555e12, 300e9, 25e9, 40,
        (("dense BF16 312 TFLOP/s, HBM2 40 GB 1,555 GB/s, NVLink 3 600 GB/s", A100_DATASHEET),
         ("8 GPUs per node, one 200 Gb/s HDR InfiniBand port per GPU for compute traffic", DGX_A100_GUIDE)),
    ),
    "a100-80g": Cluster(
        "a100-80g", "A100 SXM4 80GB (HGX/DGX A100, 8 per node)", 8, 312e12, 2.039e12, 300e9, 25e9, 80,
        (("dense BF16 312 TFLOP/s, HBM2e 80 GB 2,039 GB/s, NVLink 3 600 GB/s", A100_DATASHEET),
         ("8 GPUs per node, one 200 Gb/s HDR InfiniBand port per GPU for compute traffic", DGX_A100_GUIDE)),
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


def optimizer_params_per_rank(inv: ModelInventory, layout: Layout, world: int) -> float:
    """Parameters whose AdamW and EMA update a rank runs (its shard, or everything under DDP)."""
    r, s, t = layout.mesh(world)
    if layout.strategy == "ddp":
        return inv.trainable
    if layout.strategy == "fsdp2":
        return sum(fsdp_padded(p.tp_shape(t), s) for p in inv.params if p.trainable) / s
    return inv.trainable / world


def step_timing(flows: list[Flow], compute_s: float, optimizer_s: float, cluster: Cluster,
                a: Assumptions, recompute_s: float = 0.0) -> dict[str, float]:
    """The overlap model (docs/scaling.md, "Overlap"): per pass, compute and each link work in
    parallel, so a pass takes the longest of them, plus the calls that cannot overlap (the first
    gather, the last reduction). Tensor-parallel all-reduces sit inside the compute. After the
    backward come the optimizer, the EMA and the step-phase collectives, in sequence.
    ``recompute_s`` (activation checkpointing: the blocks' forward again) lengthens the backward."""
    passes = {"forward": compute_s / 3, "backward": 2 * compute_s / 3 + recompute_s}
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


def project_step(inv: ModelInventory, cluster: Cluster, layout: Layout, settings: StepSettings, world: int,
                 global_batch: int, a: Assumptions, recompute: bool = False) -> dict[str, float]:
    """Step time and efficiency of one optimizer step of ``layout`` on ``world`` devices of ``cluster``.

    Compute is the step's FLOPs (``inv.flops_per_image`` x the images of a data-parallel rank,
    split over the tensor-parallel group) at ``a.mfu`` of the device's peak; the optimizer and EMA
    read and write ``a.optimizer_bytes_per_param`` per parameter a rank steps at the HBM rate; the
    collectives are :func:`formula_traffic`'s, timed by :func:`step_timing`. With ``recompute``
    (activation checkpointing) the backward runs each block's forward once more: one third of the
    step's FLOPs again, which the MFU convention does not count (the efficiency drops by as much).

    Returns:
        ``bytes_per_rank``, ``bytes_in_node``, ``bytes_across_nodes``, ``compute_s``, ``optimizer_s``,
        the passes of :func:`step_timing` (``step_s`` among them), ``ideal_s`` (the step at the MFU
        with no communication and no recomputation), ``efficiency`` and ``images_per_s``.
    """
    r, s, t = layout.mesh(world)
    data_ranks = r * s
    flows = formula_traffic(inv, world, layout, settings)
    compute_s = (global_batch / data_ranks) * inv.flops_per_image / (t * cluster.peak_flops * a.mfu)
    optimizer_s = a.optimizer_bytes_per_param * optimizer_params_per_rank(inv, layout, world) / cluster.hbm_bytes_per_s
    timing = step_timing(flows, compute_s, optimizer_s, cluster, a, recompute_s=compute_s / 3 if recompute else 0.0)
    ideal_s = global_batch * inv.flops_per_image / (world * cluster.peak_flops * a.mfu)
    intra_bytes = sum(f.rank_bytes for f in flows if flow_seconds(f, cluster, a)[1] == 0)
    return {
        "bytes_per_rank": total_rank_bytes(flows), "bytes_in_node": intra_bytes,
        "bytes_across_nodes": total_rank_bytes(flows) - intra_bytes, "compute_s": compute_s,
        "optimizer_s": optimizer_s, **timing, "ideal_s": ideal_s, "efficiency": ideal_s / timing["step_s"],
        "images_per_s": global_batch / timing["step_s"],
    }
