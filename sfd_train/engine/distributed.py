"""Process-group set-up and the world a rank lives in."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sfd_train import device as devices


@dataclass
class World:
    """Where this process sits.

    Two gloo groups carry CPU-side collectives: ``checkpoint_group`` is used by the
    background thread of asynchronous saves, ``control_group`` by the main thread
    (preemption vote, NaN check). Collectives from two threads on one group could
    interleave differently on different ranks and deadlock.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    checkpoint_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    """The number of ranks torchrun (or a launcher) announced; 1 for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (released before it is returned) for a local rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device_type: str, backend: str = "auto", timeout: timedelta = timedelta(minutes=5)) -> World:
    """Starts the default process group (also for a single process: FSDP2 and DCP need one).

    Args:
        device_type: from :func:`sfd_train.engine.device.detect_device_type`.
        backend: ``auto`` or an explicit collective backend.
        timeout: how long any collective (of every group made here) waits for the
            other ranks before it fails (``parallel.collective_timeout``).
    """
    if "RANK" not in os.environ:
        # A plain process is a world of one. DeepSpeed reads these variables itself
        # (and asserts on LOCAL_RANK), so they are set as torchrun would set them.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    rank = int(os.environ["RANK"])
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    device = devices.local_device(device_type, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=devices.collective_backend(device_type, backend),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    # Groups made without a timeout would wait the default 30 minutes.
    checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)
    control_group = dist.new_group(backend="gloo", timeout=timeout)
    return World(rank, world_size, local_rank, device, checkpoint_group, control_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over ranks of scalar tensors, in one collective."""
    if not values:
        return {}
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))
