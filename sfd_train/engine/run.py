"""Starts the process group, runs the trainer, and tears down cleanly on every path."""

from __future__ import annotations

import logging
import warnings

from sfd_train.config import Config
from sfd_train import device as devices
from sfd_train.engine.distributed import init_distributed, shutdown
from sfd_train.engine.run_lock import RunFolderBusy

FOLDER_BUSY_EXIT_CODE = 3

logger = logging.getLogger("sfd_train")


def run_training(config: Config) -> int:
    """Trains with ``config`` on this process's rank; returns the exit code."""
    # The model returns a reshaped (view) velocity; nothing modifies it in place, which
    # is what this FSDP2 warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
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
    except RunFolderBusy:  # rank 0 has logged which job holds the folder
        return FOLDER_BUSY_EXIT_CODE
    finally:
        shutdown()
