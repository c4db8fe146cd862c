"""Preemption: a signal or a time budget stops every rank at the same step.

SIGUSR2 (Slurm's warning signal), SIGTERM (scancel, Kubernetes, torchrun passing on its own
SIGTERM) and SIGINT (Ctrl-C) only set a flag; a second SIGINT stops at once. At each step boundary
the ranks agree on the flag with one small all-reduce (MAX) on the gloo group, so
they all save the same step, write the requeue marker and exit with
:data:`REQUEUE_EXIT_CODE`, which the launchers turn into a requeue.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sfd_train.launchers.contract import PREEMPTION_SIGNALS, REQUEUE_EXIT_CODE, REQUEUE_FILENAME  # noqa: F401 (re-exported)

# The numbers are the launchers' contract (sysexits' EX_TEMPFAIL, a marker file,
# because torchrun turns a worker's exit code into its own status 1).
REQUEUE_FILE = REQUEUE_FILENAME
SIGNALS = {name: getattr(signal, name) for name in PREEMPTION_SIGNALS}
# Vote codes: the largest wins, so every rank reports the same reason.
_CODES = {None: 0, "time limit": 1, **{f"signal {name}": 2 + i for i, name in enumerate(PREEMPTION_SIGNALS)}}
_REASONS = {code: reason for reason, code in _CODES.items()}


class PreemptionWatcher:
    """Watches for stop signals and the wall-time budget.

    Args:
        time_limit_s: stop once this much wall time has passed since start (0 = never).
        group: process group for the vote (a gloo group: the flag is a CPU tensor).
    """

    def __init__(self, time_limit_s: float = 0.0, group: dist.ProcessGroup | None = None):
        self.time_limit_s = time_limit_s
        self.group = group
        self.started = time.monotonic()
        self.received: str | None = None
        self._previous = {}
        for name, signum in SIGNALS.items():
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        self.received = name

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def local_reason(self) -> int:
        if self.received is not None:
            return _CODES[f"signal {self.received}"]
        if self.time_limit_s and time.monotonic() - self.started >= self.time_limit_s:
            return _CODES["time limit"]
        return 0

    def should_stop(self) -> str | None:
        """Agreed across ranks: the reason to stop now, or None. Call at every step boundary."""
        flag = torch.tensor([self.local_reason()], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return _REASONS[int(flag.item())]


def write_requeue_marker(run_dir: Path, step: int, reason: str) -> None:
    """Tells the launcher that this run stopped on purpose and wants to be requeued."""
    path = Path(run_dir) / REQUEUE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason, "time": time.time()}))
    os.replace(tmp, path)


def clear_requeue_marker(run_dir: Path) -> None:
    (Path(run_dir) / REQUEUE_FILE).unlink(missing_ok=True)
