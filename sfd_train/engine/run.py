"""Starts the process group, runs the trainer, and tears down cleanly on every path."""

from __future__ import annotations

import logging

from sfd_train.config import Config
from sfd_train.engine import device as devices
from sfd_train.engine.distributed import init_distributed, shutdown

logger = logging.getLogger("sfd_train")


def run_training(config: Config) -> int:
    """Trains with ``config`` on this process's rank; returns the exit code."""
    device_type = devices.detect_device_type(config.run.device)
    if device_type == "npu":
        devices.enable_mindspeed_if_requested()
    world = init_distributed(device_type, config.parallel.backend)
    if not world.is_main:
        logging.getLogger("sfd_train").setLevel(logging.WARNING)
    from sfd_train.engine.trainer import Trainer

    try:
        trainer = Trainer(config, world)
        return trainer.fit()
    finally:
        shutdown()
