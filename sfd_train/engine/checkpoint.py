"""Checkpoints that survive preemption: asynchronous, committed, pruned, reshardable.

Layout of a run folder::

    <run.output_dir>/checkpoints/step_000001000/   one checkpoint (DCP files, or DeepSpeed's)
    <run.output_dir>/checkpoints/step_000001000/COMMITTED   written last, by rank 0

A checkpoint counts only once ``COMMITTED`` exists: rank 0 writes it after every rank
has finished writing (for DCP: when its save future resolves, which requires every
rank's write results). The marker lists every file with its size, so a truncated
file is detected before anything is loaded.

DDP and FSDP2 save with ``torch.distributed.checkpoint`` (sharded state, so a run may
resume on a different number of ranks); saves are asynchronous on a dedicated gloo
group: the copy to host memory runs alongside compute and is awaited before the next
optimizer step changes the weights. DeepSpeed ZeRO uses its own format through the
same interface (synchronously, and on the same number of ranks).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from sfd_train.config.schema import CheckpointConfig
from sfd_train.engine.distributed import World
from sfd_train.engine.strategy import Strategy

logger = logging.getLogger("sfd_train")

MARKER = "COMMITTED"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def write_marker(directory: Path, step: int) -> None:
    """Commits a checkpoint: lists its files and sizes, written atomically, last."""
    marker = {"step": step, "time": time.time(), "files": _file_sizes(directory)}
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, directory / MARKER)


def verify(directory: Path) -> int:
    """Checks a committed checkpoint's files against its marker; returns its step.

    Raises:
        CheckpointError: no marker (incomplete save), or a missing or truncated file.
    """
    marker_path = directory / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{directory}: no {MARKER} marker (the save did not complete)")
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: unreadable {MARKER} marker ({err})") from None
    for name, size in marker["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: file {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{directory}: file {name} is truncated ({path.stat().st_size} of {size} bytes)")
    return int(marker["step"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """All ``step_*`` folders under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def newest_complete(root: Path, log=logger.warning) -> Path | None:
    """The newest checkpoint that verifies; explains every newer one it skips."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            log(f"skipping checkpoint: {err}")
    return None


class CheckpointManager:
    """Saves and restores the whole training state of one run.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        config: the checkpoint section.
        world: this rank's world (its gloo group carries the checkpoint collectives).
        strategy: the parallel strategy holding model, EMA and optimizer.
    """

    def __init__(self, run_dir: Path, config: CheckpointConfig, world: World, strategy: Strategy):
        self.root = Path(run_dir) / "checkpoints"
        self.config, self.world, self.strategy = config, world, strategy
        self.uses_dcp = hasattr(strategy, "checkpoint_items")
        self._stager: DefaultStager | None = None
        self._staging: Future | None = None
        self._pending: tuple[int, Path, Future] | None = None
        self.last_blocked_s = 0.0
        if world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- saving
    def save(self, step: int, train_state: dict[str, Any], wait: bool = False) -> None:
        """Saves the state after ``step`` optimizer steps.

        Args:
            step: the step count the checkpoint resumes from.
            train_state: small picklable items (step, data position, config, ...);
                ``train_state["rng"]`` is this rank's RNG state and is kept per rank.
            wait: block until the checkpoint is committed (preemption, end of run).
        """
        start = time.perf_counter()
        self.wait_until_saved()  # one save in flight at a time
        directory = self.root / step_dir_name(step)
        if (directory / MARKER).is_file():
            return  # this step is already committed (e.g. a finished run started again)
        if self.world.is_main and directory.exists():
            shutil.rmtree(directory)  # a leftover of an interrupted save of this step
        if self.world.is_main:
            directory.mkdir(parents=True)
            shared = {k: v for k, v in train_state.items() if k != "rng"}
            torch.save(shared, directory / TRAIN_STATE)
        dist.barrier(group=self.world.checkpoint_group)
        if self.uses_dcp:
            self._save_dcp(step, directory, train_state, wait)
        else:
            self.strategy.save(directory, client_state={"rng": train_state.get("rng")})
            dist.barrier(group=self.world.checkpoint_group)
            self._commit(step, directory)
        self.last_blocked_s = time.perf_counter() - start
        if wait:
            self.wait_until_saved()

    def _dcp_state(self, train_state: dict[str, Any]) -> dict[str, Any]:
        state = dict(self.strategy.checkpoint_items())
        # The per-rank RNG state goes under a rank-specific key (DCP keeps one copy of
        # equal keys), pickled so that DCP stores it as one object.
        state[self._rng_key()] = {"pickle": pickle.dumps(train_state.get("rng"))}
        return state

    def _rng_key(self) -> str:
        return f"rng_rank{self.world.rank:05d}"

    def _save_dcp(self, step: int, directory: Path, train_state: dict[str, Any], wait: bool) -> None:
        state = self._dcp_state(train_state)
        if wait:
            dcp.save(state, checkpoint_id=str(directory), process_group=self.world.checkpoint_group)
            self._commit(step, directory)
            return
        if self._stager is None:
            accelerated = self.world.device.type != "cpu"
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=accelerated, use_shared_memory=False,
                    use_async_staging=True, use_non_blocking_copy=accelerated,
                )
            )
        response = dcp.async_save(
            state, checkpoint_id=str(directory), process_group=self.world.checkpoint_group,
            async_stager=self._stager,
        )
        self._staging = response.staging_completion
        self._pending = (step, directory, response.upload_completion)

    def wait_for_staging(self) -> None:
        """Blocks until the in-flight save has copied the weights; call before optimizer.step()."""
        if self._staging is not None:
            start = time.perf_counter()
            self._staging.result()
            self._staging = None
            self.last_blocked_s += time.perf_counter() - start

    def poll(self) -> None:
        """Commits the in-flight save if it has finished (non-blocking)."""
        if self._pending is not None and self._pending[2].done():
            self._finish_pending()

    def wait_until_saved(self) -> None:
        """Blocks until the in-flight save (if any) is written and committed."""
        self.wait_for_staging()
        if self._pending is not None:
            self._pending[2].result()
            self._finish_pending()

    def _finish_pending(self) -> None:
        step, directory, future = self._pending
        self._pending = None
        future.result()  # re-raises a failed write
        self._commit(step, directory)

    def _commit(self, step: int, directory: Path) -> None:
        if self.world.is_main:
            write_marker(directory, step)
            self.prune()
            logger.info(f"checkpoint committed: {directory}")

    def prune(self) -> None:
        """Keeps the newest ``keep`` complete checkpoints; removes older and abandoned ones."""
        entries = list_checkpoints(self.root)
        complete = [(s, p) for s, p in entries if (p / MARKER).is_file()]
        keep = {p for _, p in complete[-self.config.keep:]}
        newest = complete[-1][0] if complete else -1
        in_flight = self._pending[1] if self._pending else None
        for step, path in entries:
            if path in keep or path == in_flight or step > newest:
                continue
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        self.wait_until_saved()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---------------------------------------------------------------- loading
    def newest_complete(self) -> Path | None:
        return newest_complete(self.root, log=logger.warning if self.world.is_main else (lambda _msg: None))

    @staticmethod
    def read_train_state(directory: Path) -> dict[str, Any]:
        """The small shared items of a verified checkpoint (step, data position, config, ...).

        Raises:
            CheckpointError: the checkpoint does not verify or its state is unreadable.
        """
        verify(directory)
        try:
            return torch.load(directory / TRAIN_STATE, weights_only=False)
        except Exception as err:  # a corrupt pickle raises many kinds of errors
            raise CheckpointError(f"{directory}: unreadable {TRAIN_STATE} ({err})") from None

    def load(self, directory: Path, train_state: dict[str, Any]) -> Any:
        """Restores model, EMA, optimizer and schedule from a verified ``directory``.

        Args:
            train_state: from :meth:`read_train_state`, after the caller checked it.

        Returns:
            This rank's saved RNG state, or None when the checkpoint was written by a
            different number of ranks.

        Raises:
            CheckpointError: the checkpoint's format does not fit this run's strategy.
        """
        same_world = train_state.get("world_size") == self.world.world_size
        if not self.uses_dcp:
            if not (directory / "deepspeed").is_dir():
                raise CheckpointError(
                    f"{directory}: not a DeepSpeed checkpoint, but parallel.strategy is {self.strategy.kind}"
                )
            if not same_world:
                raise CheckpointError(
                    f"{directory}: written by {train_state.get('world_size')} ranks; DeepSpeed checkpoints resume "
                    f"on the same number of ranks, this run has {self.world.world_size}"
                )
            return self.strategy.load(directory).get("rng")
        if not (directory / ".metadata").is_file():
            raise CheckpointError(
                f"{directory}: not a torch.distributed.checkpoint folder, but parallel.strategy is {self.strategy.kind}"
            )
        state = dict(self.strategy.checkpoint_items())
        if same_world:
            state[self._rng_key()] = {"pickle": None}
        # The default planner is strict: a key this run needs but the checkpoint lacks is an error.
        dcp.load(state, checkpoint_id=str(directory), process_group=self.world.checkpoint_group)
        return pickle.loads(state[self._rng_key()]["pickle"]) if same_world else None
