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
            str(_free_port()), "-m", "sfd_train.train", str(config), *overrides]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(config: Path, overrides: list[str] = (), nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a training job to the end; fails the test with its output if it fails."""
    result = subprocess.run(command(config, list(overrides), nproc), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def start(config: Path, overrides: list[str] = (), nproc: int = 1, log: Path | None = None) -> subprocess.Popen:
    """Starts a run in its own process group (so the test can signal or kill all of it)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(config, list(overrides), nproc), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, timeout: float = 240, what: str = "condition", proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


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
