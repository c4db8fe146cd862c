"""What the launch scripts and the trainer agree on.

The trainer imports these names rather than repeating the numbers, so that the two
sides cannot drift apart:

* A worker that stopped for preemption (SIGUSR2 before the Slurm time limit, SIGTERM,
  or ``run.time_limit``) exits with :data:`REQUEUE_EXIT_CODE` after rank 0 has written
  ``<run.output_dir>/REQUEUE``. torchrun's agent turns any failing worker into its own
  exit status 1 and loses the code, so the scripts decide "requeue" by the presence of
  that file, which rank 0 writes only once the checkpoint is complete (and all ranks
  pass a barrier after it, so no node exits before the file exists).
* A node whose set-up is broken (no CANN environment, MindSpeed requested but not
  importable) exits with :data:`SETUP_ERROR_EXIT_CODE`; the Slurm script never
  requeues a job for it, since a retry would fail the same way.
* With ``launcher.ascend.mindspeed: true`` the node script exports
  :data:`MINDSPEED_ENV` ``=1``; the trainer then imports ``mindspeed.megatron_adaptor``
  lazily, before building the model.
"""

from __future__ import annotations

import os
from pathlib import Path

REQUEUE_EXIT_CODE = 75
"""Exit code of a worker that checkpointed and wants to be requeued (sysexits EX_TEMPFAIL)."""

REQUEUE_FILENAME = "REQUEUE"
"""Name of the file (JSON: step, reason) that rank 0 writes in run.output_dir after the checkpoint."""

SETUP_ERROR_EXIT_CODE = 78
"""Exit code of a node script whose environment is unusable (sysexits EX_CONFIG); never retried."""

MINDSPEED_ENV = "SFD_ENABLE_MINDSPEED"
"""Set to 1 on Ascend nodes when MindSpeed is enabled; the trainer imports mindspeed.megatron_adaptor."""

PREEMPTION_SIGNALS = ("SIGUSR2", "SIGTERM", "SIGINT")
"""Signals the trainer treats as "checkpoint at the next step and exit for a requeue" (SIGINT: a
terminal's Ctrl-C, which torchrun passes on to its workers; a second Ctrl-C stops at once)."""


def requeue_file(output_dir: str | os.PathLike) -> Path:
    """The REQUEUE marker of the run in ``output_dir``."""
    return Path(output_dir) / REQUEUE_FILENAME
