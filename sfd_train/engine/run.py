"""Starts the process group, runs the trainer, and tears down cleanly on every path.

Every way a run can end becomes an exit code and, for the expected failures, one
line that names what is wrong (no traceback):

==== ==========================================================================
0    finished (or already finished)
1    failed while running: a checkpoint could not be written, the loss diverged,
     a collective timed out (the ranks that stopped answering are named), a
     data error after start-up
2    bad input found before training: config, data folder, a checkpoint this run
     cannot continue
3    the run folder is in use by another job
75   stopped for a requeue after a checkpoint (preemption signal, time limit)
==== ==========================================================================
"""

from __future__ import annotations

import logging
import sys
import warnings
from datetime import timedelta

from sfd_train import device as devices
from sfd_train.config import Config, ConfigError
from sfd_train.config.schema import parse_duration
from sfd_train.data_pipeline.errors import DataError
from sfd_train.engine.checkpoint import CheckpointError, CheckpointSaveError
from sfd_train.engine.distributed import init_distributed, shutdown
from sfd_train.engine.liveness import Heartbeat, LauncherWatch, describe_silent_ranks, is_collective_timeout, \
    launched_by_torchrun
from sfd_train.engine.run_lock import RunFolderBusy
from sfd_train.engine.task import TrainingTask
from sfd_train.safe_load import UnsafeFileError

FOLDER_BUSY_EXIT_CODE = 3
BAD_INPUT_EXIT_CODE = 2
FAILED_EXIT_CODE = 1

logger = logging.getLogger("sfd_train")


def run_training(config: Config, task: type[TrainingTask]) -> int:
    """Trains ``task`` with ``config`` on this process's rank; returns the exit code.

    Args:
        config: the validated job config (of the task's config class).
        task: what is trained (from :mod:`sfd_train.config.registry`).
    """
    # The model returns a reshaped (view) velocity; nothing modifies it in place, which
    # is what this FSDP2 warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if launched_by_torchrun():
        LauncherWatch()  # torchrun's ranks would outlive a killed torchrun otherwise
    device_type = devices.detect_device_type(config.run.device)
    if device_type == "npu":
        devices.enable_mindspeed_if_requested()
    timeout_s = parse_duration(config.parallel.collective_timeout)
    world = init_distributed(device_type, config.parallel.backend, timedelta(seconds=timeout_s))
    if not world.is_main:
        logging.getLogger("sfd_train").setLevel(logging.WARNING)
    heartbeat = Heartbeat(world.rank, world.world_size, warn_after_s=min(60.0, timeout_s / 2))
    from sfd_train.engine.trainer import Trainer, TrainingDiverged

    trainer = None
    try:
        trainer = Trainer(config, world, task, heartbeat=heartbeat)
        return trainer.fit()
    except RunFolderBusy:  # rank 0 has logged which job holds the folder
        return FOLDER_BUSY_EXIT_CODE
    except (CheckpointSaveError, TrainingDiverged) as err:
        return _fail(world.is_main, err, FAILED_EXIT_CODE)
    except (ConfigError, CheckpointError, UnsafeFileError) as err:
        return _fail(world.is_main, err, BAD_INPUT_EXIT_CODE)
    except DataError as err:
        return _fail(True, err, FAILED_EXIT_CODE)  # may concern this rank's data only
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        step = trainer.step if trainer is not None else "start-up"
        print(f"sfd-train: rank {world.rank}: a collective waited longer than parallel.collective_timeout "
              f"({config.parallel.collective_timeout}) at step {step}; {describe_silent_ranks(world.world_size, world.rank)}."
              " Stop the job and run it again to resume from the newest complete checkpoint.",
              file=sys.stderr, flush=True)
        return FAILED_EXIT_CODE
    finally:
        heartbeat.stop()
        shutdown()


def _fail(report: bool, err: Exception, code: int) -> int:
    """One line on stderr (from rank 0 when every rank hit the same error); returns ``code``."""
    if report:
        print(f"sfd-train: {err}", file=sys.stderr, flush=True)
    return code
