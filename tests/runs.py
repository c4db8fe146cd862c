"""Helpers that start real training runs (one process, or several ranks under torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from fake_cluster.fakeslurm import descendants, is_running
from ports import free_port

# A model and data small enough for 2 CPU cores; every run in the tests starts from it.
TINY = {
    "model": {"size": "custom", "depth": 2, "hidden_size": 64, "num_heads": 4, "input_size": 8, "in_channels": 16,
              "semantic_channels": 4, "num_classes": 10, "repa_projector_dim": 32, "repa_feature_dim": 32},
    "data": {"path": "synthetic", "num_workers": 0},
    "train": {"max_steps": 8, "global_batch_size": 16, "mixed_precision": "fp32", "log_every": 1,
              "sample_every": 0, "ema_decay": 0.9},
    "optimizer": {"lr": 1.0e-3, "warmup_steps": 2},
    "parallel": {"strategy": "fsdp2", "param_dtype": "fp32"},
    "checkpoint": {"every": 0, "keep": 10},
    "run": {"device": "cpu", "wandb_mode": "disabled"},
}


def write_config(path: Path, **sections) -> Path:
    config = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, overrides: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "sfd_train.train", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(free_port()), "-m", "sfd_train.train", str(config), *overrides]


def train(config: Path, overrides: list[str] = (), nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a training job to the end; fails the test with its output if it fails or hangs."""
    cmd = command(config, list(overrides), nproc)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_diagnosable_env(),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _dump_stacks(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"training hung for {timeout:.0f} s; every thread's stack:\n{stdout[-3000:]}\n{stderr[-12000:]}") from None
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start(config: Path, overrides: list[str] = (), nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    """Starts a run in a session of its own (a signal to the test's group does not reach it);
    stop it with :func:`kill_run`."""
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(command(config, list(overrides), nproc), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env=_diagnosable_env())
    proc.log = log
    return proc


def wait_for(predicate, timeout: float = 240, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    """Polls ``predicate``; a run that exits first, or a timeout, fails with the run's log
    (after a timeout, with every thread's stack of every process of the run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}{_log_tail(proc)}")
        time.sleep(0.2)
    if proc is not None and proc.poll() is None:
        _dump_stacks(proc)
        proc.wait(timeout=60)
    raise AssertionError(f"timed out waiting for {what}{_log_tail(proc)}")


def _diagnosable_env() -> dict[str, str]:
    # faulthandler prints every thread's Python stack on SIGABRT (see _dump_stacks).
    return {**os.environ, "PYTHONFAULTHANDLER": "1"}


def _dump_stacks(proc: subprocess.Popen) -> None:
    """Makes every process of a hung run print its threads' stacks, one after another, then
    stops the run. All are paused first, so no process reacts to another one's death."""
    tree = [proc.pid, *descendants(proc.pid)]
    _signal_all(tree, signal.SIGSTOP)
    for pid in tree:
        _signal_all([pid], signal.SIGABRT)
        _signal_all([pid], signal.SIGCONT)
        time.sleep(0.5)  # faulthandler writes from the signal handler; keeps the dumps apart
    _signal_all(tree, signal.SIGKILL)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _log_tail(proc: subprocess.Popen | None, chars: int = 12000) -> str:
    log = getattr(proc, "log", None)
    if log is None or not Path(log).is_file():
        return ""
    return f"; its log ({log}) ends:\n{Path(log).read_text(errors='replace')[-chars:]}"


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILLs every process of a run: the launcher, its ranks and their data workers.

    torchrun starts each rank in a session of its own, so killing the launcher's
    process group alone would leave the ranks running (and writing checkpoints).
    """
    tree = [proc.pid, *descendants(proc.pid)]
    _signal_all(tree, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_for(lambda: not any(is_running(pid) for pid in tree), timeout=60, what="every process of the killed run to end")


def losses(run_dir: Path) -> dict[int, float]:
    from sfd_train.engine.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def committed(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMMITTED").is_file()) if root.is_dir() else []


def exported(run_dir: Path, out: Path) -> dict:
    from sfd_train.engine.weights import export_published

    export_published(run_dir, out)
    return torch.load(out, weights_only=False)
