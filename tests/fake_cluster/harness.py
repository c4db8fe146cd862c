"""Helpers shared by the launcher tests: environments with the stand-in tools, running
sfd-launch, reading what the stand-ins recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SLURM_BIN = HERE / "bin"
TORCHRUN_BIN = HERE / "torchrun_bin"
STAND_IN_TORCHRUN = TORCHRUN_BIN / "torchrun"
VENV_BIN = Path(sys.executable).parent


def base_env(*path_dirs: Path, **extra: str) -> dict[str, str]:
    """This process's environment without Slurm variables, with ``path_dirs`` first on PATH.

    The interpreter's folder comes next, so the stand-ins (``#!/usr/bin/env python3``)
    and torchrun run with this environment's Python.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SFD_", "FAKE_"))}
    env["PATH"] = os.pathsep.join([*(str(p) for p in path_dirs), str(VENV_BIN), "/usr/local/bin", "/usr/bin", "/bin"])
    env.update(extra)
    return env


def cluster_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment in which sbatch/srun/scontrol are the stand-ins, with fresh state."""
    return base_env(SLURM_BIN, FAKE_SLURM_STATE=str(tmp_path / "slurm-state"), **extra)


def sfd_launch(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs sfd-launch; on timeout it and the stand-in sbatch (which then cancels its job,
    process tree and all) get SIGTERM, so a failing test leaves no job behind."""
    cmd = [sys.executable, "-m", "sfd_train.launchers.cli", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
        raise AssertionError(f"sfd-launch did not finish in {timeout} s\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def job_record(env: dict[str, str], job_id: int = 1000) -> dict:
    return json.loads((Path(env["FAKE_SLURM_STATE"]) / f"job-{job_id}.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_job_config(path: Path, **sections: dict) -> Path:
    """A job config (the defaults, run.name launchtest, plus ``sections``) for tests
    that do not need a preset."""
    data: dict = {"run": {"name": "launchtest"}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))
    return path
