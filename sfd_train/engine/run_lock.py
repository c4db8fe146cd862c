"""One job per run folder: rank 0 holds an exclusive lock on ``<run>/.lock`` while it trains.

Two jobs writing the same run folder would overwrite each other's checkpoints (a job
started again while the ranks of a killed launcher still run, or the same config
submitted twice). The lock is a ``flock``: the kernel drops it when the holder exits,
SIGKILL included, so a requeued job never finds a stale lock. Where the filesystem
has no working locks (some Lustre and NFS mounts), the job warns and goes on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

logger = logging.getLogger("sfd_train")

LOCK_FILE = ".lock"
# flock fails with these where the filesystem cannot lock (not because another job holds it).
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunFolderBusy(RuntimeError):
    """Another job holds the run folder; the message names it."""


class RunFolderLock:
    """The lock on one run folder, held from :meth:`acquire` until :meth:`release` or exit."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock without waiting.

        Raises:
            RunFolderBusy: another live process holds it (the message says which).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCKING:
                logger.warning(f"cannot lock {self.path} ({os.strerror(err.errno)}): this filesystem has no file "
                               "locks, so make sure no other job writes to this run folder")
                return
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderBusy(f"{self.path.parent} is in use by another job ({self.holder()}); stop that job, "
                                    "or give this one another run.output_dir") from None
            raise
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (best effort: it may be mid-write)."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "holder unknown"
        job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def lock_run_folder(run_dir: Path, is_main: bool, group: dist.ProcessGroup | None) -> RunFolderLock | None:
    """Rank 0 locks ``run_dir``; every rank raises if that failed, so none waits for the others.

    Args:
        run_dir: the run folder (created if missing).
        is_main: whether this is rank 0, the one that takes the lock.
        group: a gloo group to tell the other ranks the outcome (None: a single process).

    Returns:
        The held lock on rank 0, None elsewhere.

    Raises:
        RunFolderBusy: on every rank, when another job holds the folder (rank 0 has logged why).
    """
    lock, failure = None, None
    if is_main:
        lock = RunFolderLock(run_dir)
        try:
            lock.acquire()
        except RunFolderBusy as err:
            lock, failure = None, str(err)
            # Said before the other ranks hear of it: once one of them exits, torchrun stops this one.
            logger.error(f"sfd-train: {failure}")
    if group is not None and dist.get_world_size(group) > 1:
        outcome = [failure]
        dist.broadcast_object_list(outcome, src=0, group=group)
        failure = outcome[0]
    if failure is not None:
        raise RunFolderBusy(failure)
    return lock
