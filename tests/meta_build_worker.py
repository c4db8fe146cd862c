"""One rank of tests/test_meta_build.py: builds each case's model and EMA the engine's way (meta
device, sharded, each rank's part materialised) and the old way (the whole model built on the
CPU, then tensor parallel and FSDP2 applied to it), and compares every local tensor bit for bit.

Usage: python -m torch.distributed.run --nproc-per-node N tests/meta_build_worker.py CASES.json OUT_DIR
Writes OUT_DIR/rank<r>.json: {case name: {"mismatches": [...], "checked": n, "rng_in_step": bool, ...}}.
"""

from __future__ import annotations

import copy
import json
import sys
from functools import partial
from itertools import chain
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from sfd_train.config import build_config
from sfd_train.config.registry import task_of_config
from sfd_train.engine.distributed import init_distributed, shutdown
from sfd_train.engine.parallelize import apply_fsdp2, device_meshes, parallelize_torch
from sfd_train.engine.strategy import clean_name, local_tensor
from sfd_train.engine.tensor_parallel import apply_tensor_parallel
from sfd_train.engine.weights import read_checkpoint_weights

SEED = 1234


def _tensors(module):
    return {clean_name(n): t for n, t in chain(module.named_parameters(), module.named_buffers())}


def _old_way(build, world, config, state=None):
    """Today's full build: the whole model on the CPU (optionally loaded with ``state``), then the
    parallel layout applied to it."""
    model = build()
    if state is not None:
        model.load_state_dict(state, strict=True)
    if config.parallel.strategy == "fsdp2":
        data_mesh, tp_mesh = device_meshes(world, config)
        if tp_mesh is not None:
            apply_tensor_parallel(model, tp_mesh)
        apply_fsdp2(model, data_mesh, config)
    return model


def _compare(mine, reference) -> tuple[list[str], int]:
    expected = _tensors(reference)
    got = _tensors(mine)
    mismatches = sorted(set(expected) ^ set(got))
    for name, t in expected.items():
        if name not in got:
            continue
        a, b = local_tensor(got[name]), local_tensor(t)
        if isinstance(got[name], DTensor) != isinstance(t, DTensor) or (
                isinstance(t, DTensor) and got[name].placements != t.placements) or not torch.equal(a, b):
            mismatches.append(name)
    return mismatches, len(expected)


def check(case: dict, world) -> dict:
    config = build_config(case["config"])
    task = task_of_config(config).task_class()
    build = partial(task.build_model, config, "cpu")

    torch.manual_seed(SEED)
    strategy = parallelize_torch(build, world, config, task.find_unused_parameters)
    after_meta = torch.rand(8)

    init_from = config.checkpoint.init_from
    model_state = ema_state = None
    if init_from:
        model_state, ema_state, _ = read_checkpoint_weights(init_from)
    torch.manual_seed(SEED)
    reference = _old_way(build, world, config, model_state)
    after_full = torch.rand(8)
    torch.manual_seed(SEED)  # today's EMA: a copy of the model (or the checkpoint's EMA)
    reference_ema = _old_way(build, world, config, ema_state if ema_state is not None else model_state)

    model_mismatches, checked = _compare(strategy.model, reference)
    ema_mismatches, _ = _compare(strategy.ema, reference_ema)
    # The EMA is a tensor of its own for every parameter, never the model's memory.
    shared = [n for n, t in _tensors(strategy.ema).items()
              if local_tensor(t).numel() and local_tensor(t).data_ptr() == local_tensor(_tensors(strategy.model)[n]).data_ptr()]
    sharded = sum(isinstance(p, DTensor) for p in strategy.model.parameters())
    local_numel = sum(local_tensor(p).numel() for p in strategy.model.parameters())
    return {"model_mismatches": model_mismatches, "ema_mismatches": ema_mismatches, "checked": checked,
            "rng_in_step": bool(torch.equal(after_meta, after_full)),
            "ema_shares_memory": shared, "sharded_parameters": sharded, "local_numel": local_numel}


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    world = init_distributed("cpu")
    try:
        results = {case["name"]: check(case, world) for case in cases}
        (out / f"rank{world.rank}.json").write_text(json.dumps(results, indent=1))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
