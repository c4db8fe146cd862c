"""Checkpoints that survive preemption: asynchronous, committed, pruned, reshardable.

Layout of a run folder::

    <run.output_dir>/checkpoints/step_000001000/   one checkpoint (DCP files, or DeepSpeed's)
    <run.output_dir>/checkpoints/step_000001000/COMMITTED   written last, by rank 0
    <run.output_dir>/checkpoints/rejected/step_000000900/   a damaged one, moved aside (REJECTED.txt says why)

A checkpoint counts only once ``COMMITTED`` exists: rank 0 writes it after every rank
has finished writing (for DCP: when its save future resolves, which requires every
rank's write results). The marker lists every file with its size, so a truncated
file is detected before anything is loaded.

Resuming takes the newest checkpoint that loads. One that is committed but damaged
(a truncated or missing file, an unreadable train state, tensor data that fails to
load) is moved to ``rejected/`` with the reason and the next older one is tried, so
it can neither block later saves of its step nor outlive good checkpoints in pruning.
A save that fails (disk full, permissions) stops the run with the folder and the
cause named, and leaves the older checkpoints as they were.

DDP and FSDP2 save with ``torch.distributed.checkpoint`` (sharded state, so a run may
resume on a different number of ranks); saves are asynchronous on a dedicated gloo
group: the copy to host memory runs alongside compute and is awaited before the next
optimizer step changes the weights. DeepSpeed ZeRO uses its own format through the
same interface (synchronously, and on the same number of ranks).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import pickle
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from sfd_train.config.schema import CheckpointConfig
from sfd_train.engine.distributed import World
from sfd_train.engine.strategy import Strategy
from sfd_train.safe_load import UnsafeFileError, load_torch_file, loads_pickle

logger = logging.getLogger("sfd_train")

MARKER = "COMMITTED"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which and why."""


class CorruptCheckpoint(CheckpointError):
    """A committed checkpoint whose files are damaged; resuming falls back to an older one."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the message names the folder, the cause and the free space."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file would run code while being read (see :mod:`sfd_train.safe_load`): bad input,
    never mistaken for damage (a damaged checkpoint is set aside and an older one tried)."""


def _dcp_metadata_classes() -> dict[str, type]:
    """The plain data classes a DCP ``.metadata`` pickle may construct."""
    found = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in vars(dcp_metadata).values()
             if isinstance(cls, type) and cls.__module__ == dcp_metadata.__name__
             and (dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum))}
    found[f"{_StorageInfo.__module__}.{_StorageInfo.__qualname__}"] = _StorageInfo
    return found


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, except that the ``.metadata`` pickle (which DCP reads with the full
    unpickler) must first pass the restricted one: a checkpoint folder cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            loads_pickle(stream, allowed=_dcp_metadata_classes(), name=str(path))
        return super().read_metadata(*args, **kwargs)


REJECTED = "rejected"


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
        CheckpointError: no such folder, or no marker (the save did not complete).
        CorruptCheckpoint: an unreadable marker, or a missing or truncated file.
    """
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    marker_path = directory / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{directory}: no {MARKER} marker (the save did not complete)")
    try:
        marker = json.loads(marker_path.read_text())
        files, step = dict(marker["files"]), int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"{directory}: unreadable {MARKER} marker ({err})") from None
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{directory}: file {name} is missing")
        if path.stat().st_size != size:
            raise CorruptCheckpoint(f"{directory}: file {name} is truncated ({path.stat().st_size} of {size} bytes)")
    return step


def reject(directory: Path, reason: str) -> Path:
    """Moves a damaged checkpoint to ``checkpoints/rejected/`` (never deleted: it may be
    partly recoverable), with ``REJECTED.txt`` saying why; returns its new place."""
    target = directory.parent / REJECTED / directory.name
    target.parent.mkdir(exist_ok=True)
    copy = 1
    while target.exists():
        target, copy = target.with_name(f"{directory.name}.{copy}"), copy + 1
    os.replace(directory, target)
    (target / "REJECTED.txt").write_text(reason + "\n")
    return target


def describe_save_failure(directory: Path, err: BaseException) -> str:
    """One sentence for a failed save: the folder, the operating system's reason and the free space."""
    cause = _root_cause(err)
    if isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror + (f": {cause.filename}" if cause.filename else "")
    elif "inline_container" in str(cause):
        # torch.save's zip writer turns a failed write(2) into this, without the errno.
        reason = f"a write was cut short, as on a full disk or past a file-size limit: {_first_line(cause)}"
    else:
        reason = _first_line(cause)
    try:
        stats = os.statvfs(directory.parent)
        free = f"; {stats.f_bavail * stats.f_frsize / 2**20:.1f} MiB free on that filesystem"
    except OSError:
        free = ""
    return (f"saving checkpoint {directory} failed ({reason}){free}. Older checkpoints are untouched; fix the "
            "cause (free space, permissions) and run the same command to resume from the newest complete one")


def _root_cause(err: BaseException) -> BaseException:
    """The first OSError behind ``err`` (through DCP's per-rank failures and exception
    chains), else the first exception a rank raised, else ``err``."""
    seen, pending, leaves = set(), [err], []
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            found = [failure[0] if isinstance(failure, tuple) else failure for failure in failures.values()]
            leaves.extend(found)
            pending.extend(found)
        pending.extend([current.__cause__, current.__context__])
    return leaves[0] if leaves else err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


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
        self.resumed_step: int | None = None
        """The step of the checkpoint this run resumed from (None: it started fresh)."""
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

        Raises:
            CheckpointSaveError: on every rank, when any rank failed to write its part.
        """
        start = time.perf_counter()
        self.wait_until_saved()  # one save in flight at a time
        directory = self.root / step_dir_name(step)
        if step == self.resumed_step and (directory / MARKER).is_file():
            return  # the checkpoint this run started from (a finished run started again)
        failure = self._start_folder(directory, step, train_state) if self.world.is_main else None
        self._raise_if_any_failed(failure, directory)
        if self.uses_dcp:
            self._save_dcp(step, directory, train_state, wait)
        else:
            try:
                self.strategy.save(directory, client_state={"rng": train_state.get("rng")})
                failure = None
            except Exception as err:  # noqa: BLE001 - any write error; every rank must hear of it
                failure = describe_save_failure(directory, err)
            self._raise_if_any_failed(failure, directory)
            self._commit(step, directory)
        self.last_blocked_s = time.perf_counter() - start
        if wait:
            self.wait_until_saved()

    def _start_folder(self, directory: Path, step: int, train_state: dict[str, Any]) -> str | None:
        """Rank 0: an empty folder for ``step`` holding the shared train state; a failure's description."""
        try:
            if (directory / MARKER).is_file():
                # Committed by an earlier attempt that this run did not resume from (it was
                # damaged, or newer than the checkpoint that loaded): never mixed with this run.
                moved = reject(directory, f"replaced: the run resumed from step {self.resumed_step} and saved step "
                                          f"{step} anew")
                logger.warning(f"moved the earlier checkpoint of step {step} to {moved}; saving this run's own")
            elif directory.exists():
                shutil.rmtree(directory)  # a leftover of an interrupted save of this step
            directory.mkdir(parents=True)
            torch.save({k: v for k, v in train_state.items() if k != "rng"}, directory / TRAIN_STATE)
        except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
            return describe_save_failure(directory, err)
        return None

    def _raise_if_any_failed(self, failure: str | None, directory: Path) -> None:
        """Shares the ranks' failures (a barrier too); all raise if any rank failed."""
        if dist.get_world_size(self.world.checkpoint_group) > 1:
            failures: list[str | None] = [None] * dist.get_world_size(self.world.checkpoint_group)
            dist.all_gather_object(failures, failure, group=self.world.checkpoint_group)
            failure = next((f for f in failures if f is not None), None)
        if failure is not None:
            self._discard(directory)
            raise CheckpointSaveError(failure)

    def _discard(self, directory: Path) -> None:
        """Removes what a failed save wrote (it frees the space a full disk needs)."""
        if self.world.is_main:
            shutil.rmtree(directory, ignore_errors=True)

    def _dcp_state(self, train_state: dict[str, Any]) -> dict[str, Any]:
        state = dict(self.strategy.checkpoint_items())
        # The per-rank RNG state goes under a rank-specific key (DCP keeps one copy of
        # equal keys), pickled so that DCP stores it as one object. It holds plain values and
        # NumPy arrays only, which the restricted unpickler reads back (see load()).
        state[self._rng_key()] = {"pickle": pickle.dumps(train_state.get("rng"))}
        return state

    def _rng_key(self) -> str:
        return f"rng_rank{self.world.rank:05d}"

    def _save_dcp(self, step: int, directory: Path, train_state: dict[str, Any], wait: bool) -> None:
        state = self._dcp_state(train_state)
        if wait:
            try:
                dcp.save(state, checkpoint_id=str(directory), process_group=self.world.checkpoint_group)
            except (Exception, CheckpointException) as err:  # DCP raises the ranks' write errors on every rank
                self._discard(directory)
                raise CheckpointSaveError(describe_save_failure(directory, err)) from None
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
        try:
            future.result()  # re-raises a failed write
        except (Exception, CheckpointException) as err:
            self._discard(directory)
            raise CheckpointSaveError(describe_save_failure(directory, err)) from None
        self._commit(step, directory)

    def _commit(self, step: int, directory: Path) -> None:
        if self.world.is_main:
            try:
                write_marker(directory, step)
            except OSError as err:
                self._discard(directory)
                raise CheckpointSaveError(describe_save_failure(directory, err)) from None
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

    def step_folders(self) -> list[int]:
        """The steps of every checkpoint folder in the run, complete or not (rank 0 reads, all get it)."""
        steps = [[step for step, _ in list_checkpoints(self.root)] if self.world.is_main else None]
        self._broadcast(steps)
        return steps[0]

    def restore(self, accept: Callable[[dict[str, Any], Path], None]) -> tuple[dict[str, Any], Any] | None:
        """Loads the newest checkpoint that loads; damaged ones are moved to ``rejected/``.

        Args:
            accept: called on every rank with ``(train_state, folder)`` before any tensor
                is loaded; it raises to refuse the checkpoint (a different model, say).

        Returns:
            ``(train_state, this rank's RNG state or None)``, or None when the run has no
            complete checkpoint.
        """
        partly_loaded = False
        while True:
            # Rank 0 picks the candidate and reads its shared state, so that every rank
            # tries the same one and agrees on whether it is damaged.
            found = [self._candidate() if self.world.is_main else None]
            self._broadcast(found)
            path, train_state, damage, refused = found[0]
            if refused is not None:
                raise UnsafeCheckpoint(refused)
            if path is None:
                if partly_loaded:
                    # The weights may hold part of a damaged checkpoint: not a fresh start.
                    raise CheckpointError(
                        f"no checkpoint in {self.root} could be loaded (each is in {self.root / REJECTED} with the "
                        "reason); run the same command again to start from step 0")
                return None
            path = Path(path)
            if damage is None:
                accept(train_state, path)
                try:
                    rng = self.load(path, train_state)
                    self.resumed_step = int(train_state["step"])
                    return train_state, rng
                except CorruptCheckpoint as err:
                    damage, partly_loaded = str(err), True
            if self.world.is_main:
                moved = reject(path, damage)
                logger.warning(f"checkpoint damaged: {damage}; moved it to {moved} and trying the one before it")
            dist.barrier(group=self.world.checkpoint_group)

    def _candidate(self) -> tuple[str | None, dict[str, Any] | None, str | None, str | None]:
        """``(folder, its train state, damage or None, refusal or None)`` of the newest committed checkpoint."""
        for _, path in reversed(list_checkpoints(self.root)):
            try:
                verify(path)
                return str(path), self.read_train_state(path), None, None
            except CorruptCheckpoint as err:
                return str(path), None, str(err), None
            except UnsafeCheckpoint as err:  # not damage: the user must look at it
                return str(path), None, None, str(err)
            except CheckpointError as err:  # not committed: an interrupted save, cleaned up later
                logger.warning(f"skipping checkpoint: {err}")
        return None, None, None, None

    def _broadcast(self, items: list) -> None:
        if dist.get_world_size(self.world.checkpoint_group) > 1:
            dist.broadcast_object_list(items, src=0, group=self.world.checkpoint_group)

    @staticmethod
    def read_train_state(directory: Path) -> dict[str, Any]:
        """The small shared items of a verified checkpoint (step, data position, config, ...).

        Raises:
            CheckpointError: the checkpoint is not committed.
            CorruptCheckpoint: it does not verify, or its state is unreadable.
        """
        verify(directory)
        try:
            state = load_torch_file(directory / TRAIN_STATE)
        except UnsafeFileError as err:
            raise UnsafeCheckpoint(str(err)) from None
        except Exception as err:  # a corrupt pickle raises many kinds of errors
            raise CorruptCheckpoint(f"{directory}: unreadable {TRAIN_STATE} ({_first_line(err)})") from None
        if not isinstance(state, dict) or "step" not in state:
            raise CorruptCheckpoint(f"{directory}: {TRAIN_STATE} holds no training state")
        return state

    def load(self, directory: Path, train_state: dict[str, Any]) -> Any:
        """Restores model, EMA, optimizer and schedule from a verified ``directory``.

        Args:
            train_state: from :meth:`read_train_state`, after the caller checked it.

        Returns:
            This rank's saved RNG state, or None when the checkpoint was written by a
            different number of ranks.

        Raises:
            CheckpointError: the checkpoint's format does not fit this run's strategy.
            CorruptCheckpoint: its tensor data cannot be read (on every rank alike).
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
            try:
                rng, failure = self.strategy.load(directory).get("rng"), None
            except UnsafeFileError as err:
                rng, failure = None, UnsafeCheckpoint(str(err))
            except Exception as err:  # noqa: BLE001 - any read error; every rank must hear of it
                rng, failure = None, CorruptCheckpoint(f"{directory}: cannot load the DeepSpeed state ({_first_line(err)})")
            self._raise_on_every_rank(failure)
            return rng
        if not (directory / ".metadata").is_file():
            raise CheckpointError(
                f"{directory}: not a torch.distributed.checkpoint folder, but parallel.strategy is {self.strategy.kind}"
            )
        state = dict(self.strategy.checkpoint_items())
        if same_world:
            state[self._rng_key()] = {"pickle": None}
        try:
            # The default planner is strict: a key this run needs but the checkpoint lacks is an error.
            dcp.load(state, storage_reader=SafeFileSystemReader(directory), process_group=self.world.checkpoint_group)
        except (Exception, CheckpointException) as err:  # DCP raises on every rank alike
            raise dcp_load_error(directory, err) from None
        if not same_world:
            return None
        try:
            rng, failure = loads_pickle(state[self._rng_key()]["pickle"], name=f"{directory}: {self._rng_key()}"), None
        except UnsafeFileError as err:
            rng, failure = None, UnsafeCheckpoint(str(err))
        except Exception as err:  # noqa: BLE001 - a damaged entry
            rng, failure = None, CorruptCheckpoint(f"{directory}: unreadable {self._rng_key()} ({_first_line(err)})")
        self._raise_on_every_rank(failure)
        return rng

    def _raise_on_every_rank(self, failure: CheckpointError | None) -> None:
        """Raises the first rank's failure on every rank (none is left waiting in a collective)."""
        failures = [failure]
        if dist.get_world_size(self.world.checkpoint_group) > 1:
            failures = [None] * dist.get_world_size(self.world.checkpoint_group)
            dist.all_gather_object(failures, failure, group=self.world.checkpoint_group)
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            raise first


def _refusal(text: str) -> str:
    """The refusal sentence (``PATH: refused: ... )``) out of a longer message that quotes it."""
    at = text.find(UnsafeFileError.PHRASE)
    start = text.rfind(": ", 0, at) + 2 if text.rfind(": ", 0, at) >= 0 else 0
    end = text.find(UnsafeFileError.ENDING, at)
    return text[start:end + len(UnsafeFileError.ENDING)] if end >= 0 else text[start:]


def dcp_load_error(directory: Path, err: BaseException) -> CheckpointError:
    """A DCP load failure as ours: a layout that does not fit this run, or damaged data."""
    causes = [failure[0] if isinstance(failure, tuple) else failure
              for failure in (getattr(err, "failures", None) or {}).values()] or [err]
    first = causes[0]
    unsafe = next((c for c in causes if UnsafeFileError.PHRASE in str(c)), None)
    if unsafe is not None:  # DCP hands the metadata reader's refusal on as text, inside its own
        return UnsafeCheckpoint(_refusal(str(unsafe)))
    if any(isinstance(c, (KeyError, RuntimeError)) and ("Missing key" in str(c) or "Size mismatch" in str(c))
           for c in causes):
        return CheckpointError(f"{directory}: does not fit this run ({_first_line(first)})")
    return CorruptCheckpoint(f"{directory}: tensor data cannot be read ({_first_line(first)})")
