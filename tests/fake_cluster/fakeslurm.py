"""Shared code of the stand-in Slurm executables in ``bin/`` (test fixtures).

The stand-ins run a batch script for real on this machine, with every "node" on
loopback, and check the documented contract of the real tools for what sfd-launch's
scripts use (see each executable's docstring). What they do NOT emulate: queueing,
accounting, resource limits, time limits (except on request), containers.

State shared between the executables lives in ``$FAKE_SLURM_STATE`` (a folder):
``next_job_id``, ``job-<id>.json`` (what happened to a job), ``requeue-<id>``
(written by ``scontrol requeue``), ``batch-<id>.pid``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

FORWARDED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT, signal.SIGCONT,
)


def fail(tool: str, message: str, code: int = 1) -> NoReturn:
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def state_dir() -> Path:
    path = Path(os.environ.get("FAKE_SLURM_STATE") or Path(os.environ.get("TMPDIR", "/tmp")) / "fake-slurm")
    path.mkdir(parents=True, exist_ok=True)
    return path


def next_id(name: str, start: int) -> int:
    """A counter in the state folder (jobs and steps); not safe across concurrent submitters."""
    path = state_dir() / name
    value = int(path.read_text()) if path.exists() else start
    path.write_text(str(value + 1))
    return value


def expand_hostlist(text: str) -> list[str]:
    """Slurm hostlist expansion: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Zero padding is kept; several bracket groups in one name expand as a product.
    """
    names: list[str] = []
    for item in _split_top_level(text):
        names.extend(_expand_one(item))
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append(current)
    if any(not item for item in items):
        raise ValueError(f"empty host name in host list {text!r}")
    return items


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    values = []
    for part in match.group(1).split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not bounds:
            raise ValueError(f"bad range {part!r} in host list item {item!r}")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        width = len(low)
        if int(high) < int(low):
            raise ValueError(f"descending range {part!r} in {item!r}")
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return [name for value in values for name in _expand_one(f"{head}{value}{tail}")]


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return stat.rsplit(")", 1)[1].split()


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (dead, waiting for its parent to reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def signal_tree(pid: int, sig: int, include_root: bool = True) -> None:
    """Sends ``sig`` to ``pid`` and all its descendants, as slurmstepd's process tracking
    (proctrack/cgroup) does to every process of a step."""
    targets = ([pid] if include_root else []) + descendants(pid)
    for target in targets:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass


def record_job(job_id: int, data: dict) -> None:
    path = state_dir() / f"job-{job_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def read_job(job_id: int) -> dict | None:
    path = state_dir() / f"job-{job_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
