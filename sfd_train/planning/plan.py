"""A job's plan: memory per device, the largest micro-batch that fits, step time, data bandwidth.

:func:`plan_job` takes the job as ``sfd-launch`` would run it -- the launcher's own layout
(:func:`sfd_train.launchers.layout.plan`: mesh, micro-batch, accumulation) on ``nodes`` x
``nproc_per_node`` ranks -- and a device from :mod:`.devices`, and returns a :class:`JobPlan`.

Memory comes from traced steps (:mod:`.memory`). Tracing the full model on 2 CPU cores takes
minutes for XL, so the planner traces the real model at two depths (d and d + 1 blocks) and two
micro-batches and extrapolates: every block is the same module with the same inputs, so each
block adds the same bytes to every category, and every activation is proportional to the
micro-batch. The static categories extrapolate exactly (tests check them against closed-form
byte counts); the activations are checked against a full-depth trace in the tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sfd_train.config import Config, ConfigError
from sfd_train.planning.devices import ALLOCATOR_MARGIN, DeviceSpec

GiB = 2**30
SEARCH_MICRO_BATCH = 32
"""The smallest second micro-batch traced for the largest-micro-batch search."""
TRACE_DEPTHS = (5, 6)
"""Depths of the two traced models (both moved up by the REPA tap's depth beyond 2). Below five
blocks the model's ends (embedders, the REPA projector after block 2, the final layer) shift
where the peak falls; from five on every block adds the same bytes (XL, HSDP 32 x 8, eager, two
images per rank: 51 MiB from 5 to 6 blocks, 50.3 per block from 6 to 8, and the extrapolation to
28 blocks within 0.2% of the 28-block trace)."""
PROCESS_HOST_GIB = 0.7
"""A rank's Python process with PyTorch and this package imported, before the model is built
(measured on the CPU machine of issue 29; an accelerator's runtime adds its own)."""


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes per category of a job's step as a function of the micro-batch.

    Built from traces at two micro-batches, each at full depth (measured or extrapolated), phase by
    phase (:data:`~sfd_train.planning.memory.WINDOWS`): each phase's memory is linear in the
    micro-batch, and the step's peak is the highest phase.
    """

    micro_batches: tuple[int, int]
    at: tuple[dict, dict]
    """Per phase, :class:`~sfd_train.planning.memory.StepMemory` at each of ``micro_batches``."""
    traced_depths: tuple[int, ...]
    depth: int
    compile_savings: tuple[float, ...] = ()
    """Bytes per block torch.compile keeps less than the eager trace, at each traced micro-batch
    (:func:`~sfd_train.planning.memory.compile_savings`; one row per image)."""

    def phases(self, micro_batch: int) -> dict:
        (b0, b1), (m0, m1) = self.micro_batches, self.at
        weight = 0.0 if b1 == b0 else (micro_batch - b0) / (b1 - b0)
        return {name: m0[name].combine(m1[name], weight) for name in m0}

    def phase(self, micro_batch: int) -> str:
        """The phase of the step where the peak falls."""
        phases = self.phases(micro_batch)
        return max(phases, key=lambda name: phases[name].total)

    def predict(self, micro_batch: int):
        return self.phases(micro_batch)[self.phase(micro_batch)]


# Blocks whose kept activations are alive at each phase's peak (compile_savings comes off that many).
_BLOCKS_ALIVE = {"forward": "all", "backward_first_block": "all", "backward_last_block": 1}


def _at_depth(config: Config, depth: int) -> Config:
    return replace(config, model=replace(config.model, size="custom", depth=depth,
                                         hidden_size=config.model.dims()[1], num_heads=config.model.dims()[2]))


def trace_memory(config: Config, world_size: int, accumulation: int, target: str,
                 micro_batches: tuple[int, ...]) -> MemoryModel:
    """Traces the job's step on fake tensors and a fake process group of ``world_size`` ranks.

    Args:
        config: the job's config with the launcher's mesh (``parallel`` as the ranks run it).
        world_size, accumulation: of the job.
        target: the device type (``cuda``, ``npu``, ``cpu``).
        micro_batches: one or two micro-batches to trace (the job's first).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sfd_train.planning.memory import StepTracer, compile_savings, fake_world

    traced = config
    if config.parallel.strategy not in ("ddp", "fsdp2"):
        # DeepSpeed's engine does not run on fake tensors: its activations are DDP's (fp32 parameters,
        # bf16 autocast, the same model), its model states are counted in closed form (zero_states).
        traced = replace(config, parallel=replace(config.parallel, strategy="ddp", dp_replicate=1, dp_shard=-1))
    depth = config.model.dims()[0]
    lift = max(0, config.model.repa_depth - 2)
    depths = (depth,) if depth <= TRACE_DEPTHS[1] + lift else tuple(d + lift for d in TRACE_DEPTHS)
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    measured: dict[int, list] = {}
    with fake_world(world_size):
        for d in depths:
            tracer = StepTracer(_at_depth(traced, d), world_size, accumulation, target, fake)
            measured[d] = tracer.measure(micro_batches)
            block_inputs = tracer.block_inputs
            del tracer
        per_image = 0.0
        if config.parallel.compile:
            per_image = compile_savings(traced, block_inputs, max(2, max(micro_batches)), fake)
    torch._dynamo.reset()
    at = []
    for index, micro_batch in enumerate(micro_batches):
        phases = {}
        for name in measured[depths[0]][index]:
            memory = measured[depths[0]][index][name]
            if len(depths) == 2:
                memory = memory.combine(measured[depths[1]][index][name], (depth - depths[0]) / (depths[1] - depths[0]))
            alive = _BLOCKS_ALIVE.get(name, 0)
            saved = per_image * micro_batch * (depth if alive == "all" else alive)
            memory = replace(memory, activations=max(0.0, memory.activations - saved))
            phases[name] = zero_states(config, world_size, memory) if traced is not config else memory
        at.append(phases)
    pair = (micro_batches[0], micro_batches[-1])
    return MemoryModel(pair, (at[0], at[-1]), depths, depth, tuple(per_image * b for b in micro_batches))


def zero_states(config: Config, world_size: int, traced):
    """DeepSpeed ZeRO's model states in closed form, with the activations of the traced DDP step.

    fp32 parameters and gradients (``zero_engine``: no bf16 mode), AdamW's two moments and
    DeepSpeed's fp32 copy of each rank's partition; stage 1 partitions the optimizer, stage 2 the
    gradients too, stage 3 the parameters too (over all ranks; hpZ adds a secondary copy over
    ``dp_shard``). The EMA is a full fp32 copy on every rank (``ZeroStrategy``). DeepSpeed's
    own buffers (reduce buckets, prefetch) are not modelled: 0 in ``buffers``.
    """
    from sfd_train.planning.memory import StepMemory
    from sfd_train.planning.scaling import inventory_of

    inv = inventory_of(config.model)
    stage = int(config.parallel.strategy[-1])
    params, trainable, n = inv.total * 4, inv.trainable * 4, world_size
    replicate, shard, _ = config.parallel.mesh_shape(world_size)
    return StepMemory(
        parameters=params / n + (params / shard if replicate > 1 else 0) if stage == 3 else params,
        gradients=trainable / n if stage >= 2 else trainable,
        optimizer=3 * trainable / n,
        ema=params + inv.buffer_numel * 4,
        activations=traced.activations,
        buffers=0,
    )


@dataclass
class JobPlan:
    """Everything ``sfd-launch plan`` reports about one job on one device."""

    config: Config
    layout: Any
    """The launcher's :class:`~sfd_train.launchers.layout.Layout` (mesh, micro-batch, accumulation)."""
    device: DeviceSpec
    memory: Any
    """:class:`~sfd_train.planning.memory.StepMemory` at the job's micro-batch."""
    model: MemoryModel
    fits: bool
    max_micro_batch: int
    """The largest micro-batch that fits and keeps ``train.global_batch_size`` (0: not even 1)."""
    memory_bound: int
    """The largest micro-batch that fits, whatever the global batch (the device's limit)."""
    step: dict[str, float]
    data: Any
    """:class:`~sfd_train.planning.data.DataBytes`."""
    host_bytes: float
    switches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def per_rank_images(self) -> int:
        return self.layout.micro_batch * self.layout.accumulation

    @property
    def nodes(self) -> int:
        return self.layout.nodes

    def images_per_second(self) -> float:
        return self.step["images_per_s"]

    def data_mb_per_s(self) -> tuple[float, float]:
        """``(per node, whole job)`` in MB/s (10^6 bytes)."""
        total = self.data.bytes_per_image * self.images_per_second() / 1e6
        return total / self.nodes, total

    def needed_gib(self) -> float:
        """The planned total with the allocator's margin: what must fit in ``device.usable_gib``."""
        return self.memory.total * (1 + ALLOCATOR_MARGIN) / GiB

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report: the contract keys, then ``details``."""
        per_node, total = self.data_mb_per_s()
        layout = self.layout
        return {
            "memory_gib": self.memory.gib(),
            "device_memory_gib": self.device.memory_gib,
            "fits": self.fits,
            "max_micro_batch": self.max_micro_batch,
            "step_seconds": self.step["step_s"],
            "images_per_second": self.images_per_second(),
            "data_mb_per_s_per_node": per_node,
            "data_mb_per_s_total": total,
            "host_memory_gib_per_rank": self.host_bytes / GiB,
            "details": {
                "device": self.device.key,
                "usable_memory_gib": self.device.usable_gib,
                "needed_memory_gib": self.needed_gib(),
                "layout": layout.describe(),
                "nodes": layout.nodes, "devices_per_node": layout.nproc_per_node,
                "micro_batch": layout.micro_batch, "accumulation": layout.accumulation,
                "accumulation_at_max_micro_batch": (self.per_rank_images // self.max_micro_batch
                                                    if self.max_micro_batch else None),
                "memory_bound_micro_batch": self.memory_bound,
                "efficiency": self.step["efficiency"], "mfu": self.step.get("mfu"),
                "data_bytes_per_image": self.data.bytes_per_image, "data_source": self.data.source,
                "dino_storage": self.data.dino_storage,
                "switches": self.switches,
                "peak_phase": self.model.phase(layout.micro_batch),
                "traced_depths": list(self.model.traced_depths), "traced_micro_batches": list(self.model.micro_batches),
                "plan_seconds": self.seconds,
            },
        }

    def verdict(self) -> str:
        """One line: fits or not, and what to change."""
        usable = self.device.usable_gib
        head = (f"{self.needed_gib():.1f} GiB (with the allocator's {100 * ALLOCATOR_MARGIN:.0f}% margin) of "
                f"{usable:.1f} GiB usable on a {self.device.key}")
        if self.fits:
            return f"fits: {head}"
        advice = []
        if self.max_micro_batch:
            acc = self.per_rank_images // self.max_micro_batch
            advice.append(f"train.micro_batch_size={self.max_micro_batch} (accumulation {acc} keeps "
                          f"train.global_batch_size={self.config.train.global_batch_size})")
        advice += [s["overrides"] + f" ({s['gib']:.1f} GiB)" for s in self.switches if s["fits"]]
        if not advice:
            advice.append("none of the switches tried fits: use more devices per shard group or a larger device")
        return (f"does not fit: {head}; the largest micro-batch that fits is {self.max_micro_batch}. "
                f"Would fit: {'; or '.join(advice)}")

    def summary(self) -> str:
        """The human report (``sfd-launch plan`` without ``--json``, and before a launch)."""
        config, layout, device, step = self.config, self.layout, self.device, self.step
        parallel, train = config.parallel, config.train
        gib = self.memory.gib()
        per_node, total = self.data_mb_per_s()
        precision = (f"{train.mixed_precision} autocast, parameters {parallel.param_dtype} / gradients reduced in "
                     f"{parallel.reduce_dtype}" if parallel.strategy == "fsdp2" else f"{train.mixed_precision} autocast")
        compiled = f"compile {parallel.compile_scope}" if parallel.compile else "no compile"
        checkpointing = "activation checkpointing" if parallel.activation_checkpointing else "no activation checkpointing"
        bound = (f"; memory alone allows {self.memory_bound}" if self.memory_bound != self.max_micro_batch else "")
        lines = [
            f"plan: {config.model.name} on {layout.nodes} node(s) x {layout.nproc_per_node} = {layout.world_size} x "
            f"{device.key} ({device.name}, {device.memory_gib:.1f} GiB)",
            f"layout: {layout.describe()}; {precision}; {checkpointing}; {compiled}",
            "memory per device (GiB): " + "  ".join(f"{k} {v:.2f}" for k, v in gib.items())
            + f" (the peak falls in the step's {self.model.phase(layout.micro_batch).replace('_', ' ')})",
            f"verdict: {self.verdict()}",
            f"largest micro-batch that fits: {self.max_micro_batch}"
            + (f" (accumulation {self.per_rank_images // self.max_micro_batch})" if self.max_micro_batch else "")
            + bound,
            f"step: {1e3 * step['step_s']:.0f} ms ({1e3 * step['compute_s']:.0f} ms of compute at "
            f"{100 * step['mfu']:.0f}% MFU"
            + (", +1/3 recomputed" if parallel.activation_checkpointing else "")
            + f"), {step['images_per_s']:,.0f} images/s, scaling efficiency {100 * step['efficiency']:.0f}%",
            f"data: {self.data.bytes_per_image / 1024:.0f} KiB per image ({self.data.source}; REPA features "
            f"{self.data.dino_storage}) -> {per_node:,.0f} MB/s per node, {total:,.0f} MB/s for the job",
            f"host memory per rank at start-up: {self.host_bytes / GiB:.1f} GiB",
            f"planned in {self.seconds:.0f} s: one step traced on fake tensors and a fake process group of "
            f"{layout.world_size} ranks at depths {'/'.join(map(str, self.model.traced_depths))} of "
            f"{self.model.depth} and micro-batches {'/'.join(map(str, sorted(set(self.model.micro_batches))))}",
        ]
        return "\n".join(lines)


def _largest_fitting(model: MemoryModel, usable_gib: float, candidates: list[int]) -> int:
    fitting = [b for b in candidates if model.predict(b).total * (1 + ALLOCATOR_MARGIN) / GiB <= usable_gib]
    return max(fitting, default=0)


def _memory_bound(model: MemoryModel, usable_gib: float, limit: int = 1 << 16) -> int:
    """The largest micro-batch whose predicted peak fits, whatever the global batch (0: not even one).
    The peak grows with the micro-batch, so a bisection finds it."""
    def fits(b: int) -> bool:
        return model.predict(b).total * (1 + ALLOCATOR_MARGIN) / GiB <= usable_gib

    if not fits(1):
        return 0
    low, high = 1, limit
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def layout_advice(config: Config, nodes: int, nproc_per_node: int) -> str:
    """What would let ``nodes`` x ``nproc_per_node`` ranks split the global batch (docs/scaling.md)."""
    world, batch = nodes * nproc_per_node, config.train.global_batch_size
    if batch % world == 0 or config.parallel.tp != 1:
        return ""
    from sfd_train.launchers.layout import tensor_parallel_degree

    bigger = -(-batch // world) * world
    advice = f"; e.g. train.global_batch_size={bigger} (one image or more per rank)"
    # A config that left the mesh to the launcher already got this degree; one that chose it did not.
    tp = tensor_parallel_degree(config, world, nproc_per_node)
    if tp > 1:
        advice += (f", or split each sample over {tp} ranks: parallel.strategy=fsdp2 parallel.tp={tp} "
                   f"parallel.dp_replicate={nodes} parallel.dp_shard={nproc_per_node // tp} parallel.compile=false")
    return advice


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SWITCHES = (
    ("parallel.activation_checkpointing", lambda c: not c.parallel.activation_checkpointing, True),
    ("parallel.strategy", lambda c: c.parallel.strategy in ("ddp", "zero1", "zero2"), "fsdp2"),
    ("train.mixed_precision", lambda c: c.train.mixed_precision == "fp32", "bf16"),
    ("parallel.param_dtype", lambda c: c.parallel.strategy == "fsdp2" and c.parallel.param_dtype == "fp32", "bf16"),
)
"""What the verdict tries when a job does not fit: key, when it applies, the value it sets."""


def plan_job(config: Config, nodes: int, nproc_per_node: int, device: DeviceSpec, *, search: bool = True,
             try_switches: bool = True) -> JobPlan:
    """Plans ``config`` on ``nodes`` x ``nproc_per_node`` devices of ``device`` as sfd-launch runs it.

    Args:
        config: the job config (its launcher section is not read: the arguments say where it runs).
        search: trace a second micro-batch, for the largest micro-batch that fits.
        try_switches: when the job does not fit, plan it again with each switch of :data:`SWITCHES`
            that applies (activation checkpointing, FSDP2, bf16) and report those that fit.

    Raises:
        ConfigError: the launcher refuses the layout (the nodes cannot keep the global batch or mesh).
    """
    from sfd_train.launchers.layout import plan as launcher_layout, reason
    from sfd_train.planning.data import data_bytes_per_image
    from sfd_train.planning.host import startup_host_bytes
    from sfd_train.planning.scaling import (
        CLUSTERS, Assumptions, Layout, inventory_of, project_step, settings_from_config)

    started = time.monotonic()
    try:
        layout = launcher_layout(config, nodes, nproc_per_node)
    except ConfigError as err:
        raise ConfigError(err.key, f"{reason(err)}{layout_advice(config, nodes, nproc_per_node)}") from None
    job = replace(config, parallel=layout.parallel)
    world = layout.world_size
    b0 = layout.micro_batch
    # The second micro-batch is where the search extrapolates from: at least 32 images, since on a few
    # images per rank the fixed part of each phase still shifts (XXL on HSDP 8 x 8: the line through
    # 4 and 8 images predicts 74 GiB at 161, the line through 32 and 64 predicts 57).
    search_at = max(2 * b0, SEARCH_MICRO_BATCH)
    model = trace_memory(job, world, layout.accumulation, device.accelerator, (b0, search_at) if search else (b0,))
    memory = model.predict(b0)
    usable = device.usable_gib
    fits = memory.total * (1 + ALLOCATOR_MARGIN) / GiB <= usable
    per_rank = layout.micro_batch * layout.accumulation
    max_micro = _largest_fitting(model, usable, divisors(per_rank))
    bound = _memory_bound(model, usable) if search else max_micro

    inv = inventory_of(job.model)
    replicate, shard, tp = job.parallel.mesh_shape(world)
    mesh = Layout(job.parallel.strategy, replicate, shard, tp)
    settings = settings_from_config(job, world, mesh, inv.total)
    cluster = replace(CLUSTERS[device.cluster], devices_per_node=nproc_per_node)
    assumptions = Assumptions()
    step = project_step(inv, cluster, mesh, settings, world, job.train.global_batch_size, assumptions,
                        recompute=job.parallel.activation_checkpointing)
    step["mfu"] = assumptions.mfu
    # ZeRO-3 partitions only inside deepspeed.initialize, after each rank has materialised the whole model.
    shard_group = shard * tp if job.parallel.strategy == "fsdp2" else 1
    largest = max(p.numel for p in inv.params)
    host = startup_host_bytes(inv.total, inv.buffer_numel, shard_group, largest, device_is_cpu=False) \
        + PROCESS_HOST_GIB * GiB
    plan = JobPlan(config=job, layout=layout, device=device, memory=memory, model=model, fits=fits,
                   max_micro_batch=max_micro, memory_bound=bound, step=step, data=data_bytes_per_image(job),
                   host_bytes=host)
    if not fits and try_switches:
        plan.switches = _try_switches(config, nodes, nproc_per_node, device)
    plan.seconds = time.monotonic() - started
    return plan


def _try_switches(config: Config, nodes: int, nproc_per_node: int, device: DeviceSpec) -> list[dict[str, Any]]:
    from sfd_train.config import build_config, to_dict

    out = []
    for key, applies, value in SWITCHES:
        if not applies(config):
            continue
        section, name = key.split(".")
        data = to_dict(config)
        data[section][name] = value
        try:
            switched = plan_job(build_config(data), nodes, nproc_per_node, device, search=False, try_switches=False)
        except ConfigError:
            continue
        out.append({"overrides": f"{key}={str(value).lower() if isinstance(value, bool) else value}",
                    "fits": switched.fits, "gib": switched.needed_gib()})
    return out
