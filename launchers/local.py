"""local: torchrun on this machine.

The user's config argument and overrides go to the trainer unchanged (no frozen
copy: what you type is what runs). sfd-launch then becomes torchrun (exec), so
Ctrl-C and other signals reach it directly.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from sfd_train.launchers.config import LauncherConfig


def count_local_devices() -> int:
    """CUDA GPUs, else Ascend NPUs, else 1 (one CPU process)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():  # type: ignore[attr-defined]
            return torch.npu.device_count()  # type: ignore[attr-defined]
    return 1


def torchrun_command(launcher: LauncherConfig) -> list[str]:
    # The default "torchrun" may belong to another environment on PATH; the module
    # of the interpreter running sfd-launch is the one whose torch we validated with.
    if launcher.torchrun == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run"]
    return [launcher.torchrun]


def command(config_arg: str, overrides: list[str], launcher: LauncherConfig, nproc: int) -> list[str]:
    """The full command line of a local run."""
    entry = launcher.entrypoint
    head = [entry] if entry.endswith(".py") else ["-m", entry]
    return [
        *torchrun_command(launcher),
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        # A worker that stops for a requeue ends the run; run the command again to resume.
        "--max-restarts=0",
        *head,
        config_arg,
        *overrides,
    ]


def environment(launcher: LauncherConfig) -> dict[str, str]:
    """launcher.env as strings (true/false as 1/0)."""
    return {
        name: ("1" if value else "0") if isinstance(value, bool) else str(value) for name, value in launcher.env.items()
    }


def run(cmd: list[str], env: dict[str, str]) -> None:
    """Replaces this process with ``cmd``; does not return."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, **env})
