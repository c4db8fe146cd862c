"""How long an asynchronous checkpoint blocks the training loop, vs a synchronous save.

Builds a model of a few hundred million parameters on the CPU (FSDP2, one rank),
trains a few steps, and saves the full training state (model, EMA, AdamW moments)
with the CheckpointManager, synchronously and asynchronously. "Blocked" is the
time the loop spends in the save call plus waiting for the host copy before the
next optimizer step; the upload itself runs in the background.

    python benchmarks/bench_checkpoint.py --depth 12 --width 1152 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=12, help="transformer blocks (default 12)")
    parser.add_argument("--width", type=int, default=1152, help="hidden size (default 1152, as XL)")
    parser.add_argument("--repeats", type=int, default=2, help="saves of each kind (median reported)")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: a temp folder)")
    args = parser.parse_args()

    from sfd_train.config import build_config
    from sfd_train.engine.checkpoint import CheckpointManager
    from sfd_train.engine.distributed import init_distributed, shutdown
    from sfd_train.engine.parallelize import parallelize_torch
    from sfd_train.models import build_model

    config = build_config({
        "model": {"size": "custom", "depth": args.depth, "hidden_size": args.width, "num_heads": args.width // 64 if args.width % 64 == 0 else 16,
                  "input_size": 4, "in_channels": 48, "semantic_channels": 16, "num_classes": 1000},
        "parallel": {"strategy": "fsdp2", "param_dtype": "fp32"},
        "checkpoint": {"keep": 1},
        "run": {"device": "cpu"},
        "data": {"path": "unused"},
    })
    world = init_distributed("cpu")
    torch.manual_seed(0)
    strategy = parallelize_torch(lambda: build_model(config.model), world, config)
    model = strategy.model
    params = sum(p.numel() for p in model.parameters())  # global sizes (DTensors)
    root = Path(args.dir or tempfile.mkdtemp(prefix="sfd-bench-ckpt-"))
    manager = CheckpointManager(root, config.checkpoint, world, strategy)

    x = torch.randn(2, 48, 4, 4)
    t = torch.rand(2)
    y = torch.randint(0, 1000, (2,))
    step_times = []

    def train_step() -> None:
        start = time.perf_counter()
        velocity, projection = strategy.wrapped(x, t, t, y, with_projection=True)
        (velocity.square().mean() + projection.square().mean()).backward()
        manager.wait_for_staging()
        strategy.step()
        strategy.update_ema(0.9999)
        step_times.append(time.perf_counter() - start)

    for _ in range(2):  # creates the optimizer state, warms up
        train_step()
    state_bytes = sum(t.numel() * t.element_size() for t in strategy.model.parameters()) * 4  # model, EMA, 2 moments

    sync_blocked, async_blocked, async_total = [], [], []
    step = 0
    for _ in range(args.repeats):
        step += 1
        start = time.perf_counter()
        manager.save(step, {"step": step, "world_size": 1, "rng": None}, wait=True)
        sync_blocked.append(time.perf_counter() - start)
        train_step()

        step += 1
        start = time.perf_counter()
        manager.save(step, {"step": step, "world_size": 1, "rng": None}, wait=False)
        in_call = time.perf_counter() - start
        before = manager.last_blocked_s
        train_step()  # waits for staging before its optimizer step
        staging_wait = manager.last_blocked_s - before
        while manager._pending is not None:  # let the upload finish before the next measurement
            manager.poll()
            time.sleep(0.05)
        async_total.append(time.perf_counter() - start)
        async_blocked.append(in_call + staging_wait)
    manager.close()
    shutdown()

    sync_s, async_s = statistics.median(sync_blocked), statistics.median(async_blocked)
    print(f"model: {params / 1e6:.0f}M parameters; checkpointed state {state_bytes / 2**30:.2f} GiB "
          f"(model + EMA + AdamW moments) to {root}")
    print(f"training step (CPU, batch 2): {statistics.median(step_times):.2f} s")
    print("| save | loop blocked (s) | ratio to sync |")
    print("|---|---|---|")
    print(f"| synchronous (dcp.save) | {sync_s:.2f} | 1.00 |")
    print(f"| asynchronous (dcp.async_save, staged) | {async_s:.3f} | {async_s / sync_s:.3f} |")
    print(f"asynchronous save end to end (background): {statistics.median(async_total):.2f} s")


if __name__ == "__main__":
    main()
