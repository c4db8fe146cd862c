"""Noticing what stopped answering: the launcher above a rank, or another rank.

Two failures leave a job hanging rather than failing:

* **The launcher dies** (``kill -9`` of torchrun). torchrun starts every rank in a
  session of its own, so the ranks keep training as orphans, holding the run folder's
  lock. :class:`LauncherWatch` notices within about a second that the rank's parent has
  changed and stops the rank and its data-loader workers at once, without a checkpoint
  (a save in flight stays uncommitted and is never resumed from), so running the same
  command again resumes from the newest complete checkpoint.
* **A rank stops answering** (SIGSTOP, a hung NIC, a deadlock): the others wait in
  their next collective until ``parallel.collective_timeout``. Each rank posts a
  heartbeat (a counter, its step, host and pid) to the rendezvous store every few
  seconds from a thread of its own; rank 0 warns once a rank's counter has not moved
  for a while, and a rank whose collective timed out names the ranks whose counters do
  not move (:func:`describe_silent_ranks`). Counters are compared on the reader's own
  clock, so the hosts' clocks need not agree.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

logger = logging.getLogger("sfd_train")

HEARTBEAT_INTERVAL_S = 2.0
_KEY = "sfd_heartbeat/{rank}"


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun's agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class LauncherWatch:
    """Stops this rank soon after the process that launched it has died.

    Args:
        poll_s: how often the parent pid is checked.
    """

    def __init__(self, poll_s: float = 1.0):
        self.parent = os.getppid()
        self.poll_s = poll_s
        self._thread = threading.Thread(target=self._watch, name="sfd-launcher-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.poll_s)
        _say(f"sfd-train: the launcher of this rank (pid {self.parent}) is gone; stopping rank "
             f"{os.environ.get('RANK', '?')} (pid {os.getpid()}) now, without a checkpoint. Run the same command "
             "again to resume from the newest complete checkpoint.")
        _kill_own_processes()


def _say(message: str) -> None:
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:  # the launcher's terminal or pipe may be gone with it
        pass


def _kill_own_processes() -> None:
    """SIGKILLs this process with everything it started (data-loader workers, W&B)."""
    if os.getpgid(0) == os.getpid():
        # A torchrun worker leads a process group of its own: the group is exactly it
        # and its descendants that did not move elsewhere.
        os.killpg(os.getpid(), signal.SIGKILL)
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(1)


class Heartbeat:
    """Posts this rank's heartbeat to the rendezvous store; on rank 0 also watches the others.

    Args:
        rank: this rank.
        world_size: the number of ranks.
        warn_after_s: rank 0 warns when a rank's heartbeat has not moved for this long.
        interval_s: seconds between heartbeats.
    """

    def __init__(self, rank: int, world_size: int, warn_after_s: float, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.rank, self.world_size = rank, world_size
        self.warn_after_s, self.interval_s = warn_after_s, interval_s
        self.step = 0
        """The trainer's current step; read by the heartbeat thread."""
        self._store = dist.distributed_c10d._get_default_store()
        self._identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._sequence = 0
        self._stop = threading.Event()
        self._last_moved: dict[int, tuple[int, float]] = {}
        self._warned: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="sfd-heartbeat", daemon=True)
        self._thread.start()

    def _post(self, state: str = "running") -> None:
        self._sequence += 1
        beat = {"seq": self._sequence, "step": self.step, "state": state, **self._identity}
        self._store.set(_KEY.format(rank=self.rank), json.dumps(beat))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._post()
                if self.rank == 0 and self.world_size > 1:
                    self._warn_about_silent_ranks()
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            self._stop.wait(self.interval_s)

    def _warn_about_silent_ranks(self) -> None:
        now = time.monotonic()
        for rank, beat in read_heartbeats(self._store, self.world_size).items():
            seq, since = self._last_moved.get(rank, (None, now))
            if beat is None or beat["seq"] != seq:
                self._last_moved[rank] = (beat["seq"] if beat else None, now)
                self._warned.discard(rank)
                continue
            silent = now - since
            if beat["state"] == "running" and silent >= self.warn_after_s and rank not in self._warned:
                self._warned.add(rank)
                logger.warning(f"rank {rank} ({_where(beat)}) has not answered for {silent:.0f} s (last seen at step "
                               f"{beat['step']}); the other ranks wait for it until parallel.collective_timeout")

    def stop(self) -> None:
        """Stops the thread and tells the others this rank ended on purpose."""
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
        try:
            self._post(state="ended")
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _where(beat: dict) -> str:
    return f"pid {beat['pid']} on {beat['host']}"


def read_heartbeats(store, world_size: int) -> dict[int, dict | None]:
    """Every rank's last heartbeat (None where a rank has posted none)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        key = _KEY.format(rank=rank)
        beats[rank] = json.loads(store.get(key)) if store.check([key]) else None
    return beats


def is_collective_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that gave up waiting (gloo, NCCL, HCCL wordings)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def describe_silent_ranks(world_size: int, own_rank: int, watch_s: float = 2.5 * HEARTBEAT_INTERVAL_S) -> str:
    """Which ranks stopped answering, from two readings of the heartbeats ``watch_s`` apart.

    Returns:
        A sentence naming the silent ranks (pid, host, last step), or saying that all
        still answer.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=10))  # the store's host may be the silent one
        first = read_heartbeats(store, world_size)
        time.sleep(watch_s)
        second = read_heartbeats(store, world_size)
    except Exception as err:  # noqa: BLE001
        return f"the rendezvous store did not answer either ({err}): its host (torchrun's agent on the first node, " \
               "or rank 0) may be the one that stopped"
    silent = []
    for rank in range(world_size):
        before, after = first[rank], second[rank]
        if rank == own_rank or (after is not None and after["state"] == "ended"):
            continue
        if after is None:
            silent.append(f"rank {rank} (never posted a heartbeat)")
        elif before is not None and after["seq"] == before["seq"]:
            silent.append(f"rank {rank} ({_where(after)}, last seen at step {after['step']})")
    if not silent:
        return "every other rank still answers: one of them is stuck inside the program (a deadlock) rather than stopped"
    return "not answering: " + "; ".join(silent)
