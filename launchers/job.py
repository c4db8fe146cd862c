"""A launch, resolved: absolute paths, processes per node, and the trainer's command.

Cluster jobs do not run the user's config file itself but a frozen copy in
``<run.output_dir>/launch/config.yaml`` (with an absolute ``run.output_dir``): a job
that is requeued a week later must run the same settings even if the original YAML
(or a preset) was edited in between. Re-running sfd-launch writes a new copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

from sfd_train.config import Config, ConfigError, to_dict
from sfd_train.launchers.config import LauncherConfig
from sfd_train.launchers.layout import plan, reason
from sfd_train.launchers.render import write_script

Mode = Literal["local", "slurm", "ascend"]

# Settings the launcher puts on the trainer's command line for each kind of node, so
# that a node which cannot see its accelerator fails loudly instead of training on CPU.
ACCELERATOR_OVERRIDES = {
    "cuda": ("run.device=cuda",),
    "npu": ("parallel.backend=hccl", "run.device=npu"),
    "cpu": ("parallel.backend=gloo", "run.device=cpu"),
}


@dataclass(frozen=True)
class Job:
    """Everything the renderers need, with every path absolute."""

    mode: Mode
    config: Config
    """The validated job config (run.output_dir made absolute)."""
    workdir: Path
    """Where the job runs; relative paths in the config resolve against it."""
    nproc_per_node: int
    """Worker processes per node."""

    @property
    def launcher(self) -> LauncherConfig:
        return self.config.launcher

    @property
    def accelerator(self) -> str:
        return "npu" if self.mode == "ascend" else self.config.launcher.accelerator

    @property
    def output_dir(self) -> Path:
        return Path(self.config.run.output_dir)

    @property
    def launch_dir(self) -> Path:
        """Rendered scripts and the frozen config live here, next to the run they belong to."""
        return self.output_dir / "launch"

    @property
    def config_file(self) -> Path:
        return self.launch_dir / "config.yaml"

    @property
    def node_script(self) -> Path:
        return self.launch_dir / "node.sh"

    @property
    def batch_script(self) -> Path:
        return self.launch_dir / "job.sbatch"

    @property
    def log_dir(self) -> Path:
        configured = self.launcher.slurm.log_dir
        return _absolute(configured, self.workdir) if configured else self.output_dir / "logs"

    @property
    def world_size(self) -> int:
        return self.launcher.nodes * self.nproc_per_node

    def trainer_args(self) -> list[str]:
        """What follows the torchrun options: the entry point, the frozen config, the device overrides."""
        entry = self.launcher.entrypoint
        head = [entry] if entry.endswith(".py") else ["-m", entry]
        return [*head, str(self.config_file), *ACCELERATOR_OVERRIDES[self.accelerator]]

    def freeze_config(self) -> Path:
        """Writes the frozen config the job runs; returns its path."""
        # Written atomically: every node of a multi-node Ascend run writes the same file.
        text = yaml.safe_dump(to_dict(self.config), sort_keys=False)
        write_script(self.config_file, text, executable=False)
        return self.config_file


def _absolute(path: str, base: Path) -> Path:
    # abspath, not resolve(): keep the user's spelling of paths through symlinked
    # cluster file systems (/home -> /gpfs/...), which every node shares.
    return Path(os.path.abspath(os.path.join(base, path)))


def build_job(config: Config, mode: Mode, workdir: str | os.PathLike | None = None, nproc_per_node: int | None = None) -> Job:
    """Resolves ``config`` for a launch in ``mode`` and checks what only a launch can check.

    Args:
        config: the loaded, validated config.
        mode: local, slurm or ascend.
        workdir: where the job runs (default: the current directory).
        nproc_per_node: processes per node when already decided (local's device count).

    Raises:
        ConfigError: naming the key at fault (e.g. a global batch that the ranks cannot split).
    """
    workdir = Path(os.path.abspath(workdir or os.getcwd()))
    launcher = config.launcher
    nproc = nproc_per_node if nproc_per_node is not None else launcher.nproc_per_node()
    output_dir = _absolute(config.run.output_dir, workdir)
    config = replace(config, run=replace(config.run, output_dir=str(output_dir)))
    job = Job(mode=mode, config=config, workdir=workdir, nproc_per_node=nproc)

    # The trainer would reject these only after the job waited in the queue.
    _check_layouts(job)
    if mode == "local" and launcher.nodes != 1:
        raise ConfigError("launcher.nodes", f"local runs on this machine only (1 node), got {launcher.nodes}")
    if mode == "slurm" and config.checkpoint.resume != "auto":
        raise ConfigError(
            "checkpoint.resume", "a Slurm job is requeued after preemption and must resume: use 'auto'"
        )
    if mode == "slurm":
        _check_sbatch_words(job)
    return job


def _check_layouts(job: Job) -> None:
    """Every node count the job may get must keep the global batch and fit the mesh."""
    launcher = job.launcher
    plan(job.config, launcher.nodes, job.nproc_per_node)
    if job.mode != "slurm":
        return
    counts = launcher.node_counts()
    for nodes in counts[:-1]:
        try:
            plan(job.config, nodes, job.nproc_per_node)
        except ConfigError as err:
            raise ConfigError(
                "launcher.slurm.min_nodes",
                f"Slurm may grant any of {counts.start}..{counts.stop - 1} nodes, and a grant of {reason(err)} "
                f"({err.key}); raise min_nodes or choose a global batch that every grant divides",
            ) from None


def _check_sbatch_words(job: Job) -> None:
    """#SBATCH values are not shell-quoted by sbatch: they must be single words."""
    slurm = job.launcher.slurm
    words = {
        "launcher.slurm.partition": slurm.partition,
        "launcher.slurm.account": slurm.account,
        "launcher.slurm.qos": slurm.qos,
        "launcher.slurm.job_name": slurm.job_name or job.config.run.name,
        "launcher.slurm.gres": slurm.gres,
        "launcher.slurm.log_dir" if slurm.log_dir else "run.output_dir": str(job.log_dir),
    }
    for key, value in words.items():
        if any(c.isspace() or c in "'\"" for c in value):
            raise ConfigError(key, f"{value!r} goes into an #SBATCH line and must not contain spaces or quotes")
