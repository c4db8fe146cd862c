"""Checks a plan against a real step: ``python -m sfd_train.planning.check``.

Two measurements of the same training step as :class:`~sfd_train.planning.memory.StepTracer`
builds it, on a real process group (under torchrun, or one process):

``--device cpu``   real tensors on the CPU, measured with the plan's own tracker, phase by phase
                   and category by category (what ``tests/test_plan.py`` compares with the fake
                   trace of the same step).
``--device cuda``  the job's own config on the GPU (its kernels, torch.compile, fused AdamW),
                   ``torch.cuda.max_memory_allocated`` of a steady-state step; with ``--compare``
                   the plan (made first, on fake tensors) is written next to it
                   (``benchmarks/gpu_suite.sh plan``).

Rank 0 writes the JSON given by ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Sequence

GiB = 2**30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sfd_train.planning.check",
        description="Measure a real training step's memory (CPU: per category with the plan's tracker; CUDA: "
        "max_memory_allocated) and, with --compare, put the plan next to it.",
    )
    parser.add_argument("config", help="YAML file or preset name in configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--compare", action="store_true",
                        help="plan the job first (fake tensors) and report measured / planned (one process)")
    parser.add_argument("--plan-device", default="", metavar="NAME",
                        help="the device the plan is made for (default: the GPU's memory in GiB)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sfd_train.config import load_config
    from sfd_train.config.loader import parse_args_with_overrides

    args = parse_args_with_overrides(_parser(), list(sys.argv[1:] if argv is None else argv))
    config = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    planned = _plan(config, world, args) if args.compare else None

    import torch
    import torch.distributed as dist

    from sfd_train.launchers.layout import plan as launcher_layout
    from sfd_train.planning.memory import StepTracer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    os.environ.setdefault("RANK", "0")
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", world_size=world,
                            rank=int(os.environ["RANK"]))
    try:
        layout = launcher_layout(config, 1, world)
        job = replace(config, parallel=layout.parallel)
        tracer = StepTracer(job, world, layout.accumulation, args.device, device=device)
        if args.device == "cuda":
            result = {"max_memory_allocated_gib": tracer.measure_device(layout.micro_batch) / GiB}
        else:
            phases = tracer.measure((layout.micro_batch,))[0]
            result = {"phases": {name: memory.gib() for name, memory in phases.items()}}
        result.update(layout=layout.describe(), micro_batch=layout.micro_batch, world_size=world)
        if planned is not None:
            result["planned"] = planned
            result["measured_over_planned"] = result["max_memory_allocated_gib"] / planned["memory_gib"]["total"]
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print(json.dumps(result, indent=1), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def _plan(config, world: int, args) -> dict:
    """The plan of the job on one node of ``world`` devices (made before the real process group)."""
    import torch

    from sfd_train.planning.devices import resolve_device
    from sfd_train.planning.plan import plan_job

    name = args.plan_device
    if not name:
        name = str(torch.cuda.get_device_properties(0).total_memory / GiB) if args.device == "cuda" else "80"
    return plan_job(config, 1, world, resolve_device(name), try_switches=False).to_json()


if __name__ == "__main__":
    sys.exit(main())
