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

from sfd_train.engine.distributed import free_port
# The formulas and the hardware figures live in the package, shared with `sfd-launch plan`.
from sfd_train.planning.scaling import (  # noqa: F401  (Flow, flow_seconds, fsdp_padded: tests read them here)
    CLUSTERS as ALL_CLUSTERS,
    Assumptions,
    Cluster,
    Flow,
    Layout,
    ModelInventory,
    StepSettings,
    by_key,
    flow_seconds,
    formula_traffic,
    fsdp_padded,
    inventory_of,
    project_step,
    ring_factor,
    settings_from_config,
    total_rank_bytes,
    traffic_key,
)

# The clusters this benchmark projects (the planner's table has more, e.g. A100).
CLUSTERS = {key: ALL_CLUSTERS[key] for key in ("h100", "h200", "910b")}

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
               "--master-port", str(free_port()), str(Path(__file__).resolve()), "_worker",
               "--steps", f"{COUNTED_STEPS[0]}:{COUNTED_STEPS[1]}", "--counts", str(counts), "--",
               str(config_path), f"run.output_dir={work / 'run'}", *case.layout.overrides()]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.label}: the run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    ranks = [json.loads((counts / f"rank{r}.json").read_text()) for r in range(MEASURED_WORLD)]
    return {"ranks": ranks, "wall_s": time.time() - started}



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
    return row | {
        "feasible": True, "global_batch": batch, "micro_batch": micro, "accumulation": accumulation,
        "tokens_per_micro_batch": micro * inv.tokens, **project_step(inv, cluster, layout, settings, devices, batch, a),
    }


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
