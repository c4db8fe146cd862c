"""Slurm: the batch script (``launch/job.sbatch``) and its submission.

The batch script asks for one task per node, starts ``node.sh`` on every node with
srun, passes the time-limit signal on, and after the step decides what happens next:
``REQUEUE`` present -> ``scontrol requeue`` (the trainer checkpointed); success ->
done; a failure -> requeue up to ``launcher.slurm.failure_requeues`` times in a row
(lost nodes, hung collectives), except when a node's set-up is broken.
"""

from __future__ import annotations

import subprocess
import sys

from sfd_train.launchers.contract import REQUEUE_FILENAME
from sfd_train.launchers.job import Job
from sfd_train.launchers.render import block, fill, q


def sbatch_options(job: Job) -> list[str]:
    """The #SBATCH options, in the order they appear in the script."""
    launcher = job.launcher
    slurm = launcher.slurm
    counts = launcher.node_counts()
    options = [f"--job-name={slurm.job_name or job.config.run.name}"]
    if len(counts) > 1:
        # MIN-MAX: Slurm grants as many nodes of the range as are free; node.sh fits the job
        # to the grant. No --ntasks-per-node here: with it Slurm counts MIN tasks and grants
        # MIN nodes. srun still starts one task per node.
        options.append(f"--nodes={counts.start}-{counts.stop - 1}")
    else:
        # One torchrun agent per node; it starts the node's workers itself.
        options += [f"--nodes={launcher.nodes}", "--ntasks-per-node=1"]
    gres = slurm.gres
    if gres == "auto":
        if job.accelerator == "cuda":
            options.append(f"--gpus-per-node={job.nproc_per_node}")
        elif job.accelerator == "npu":
            options.append(f"--gres=npu:{job.nproc_per_node}")
    elif gres != "none":
        options.append(f"--gres={gres}")
    if slurm.cpus_per_task:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    for name in ("partition", "account", "qos", "time"):
        value = getattr(slurm, name)
        if value:
            options.append(f"--{name}={value}")
    options += [
        # B: signals the batch shell only, which passes the signal on (see the script).
        f"--signal=B:USR2@{slurm.signal_lead}",
        "--requeue",
        # A requeued job keeps its id, so its log is the same file: append, don't truncate.
        "--open-mode=append",
        f"--output={job.log_dir}/slurm-%j.out",
        f"--error={job.log_dir}/slurm-%j.err",
        *slurm.extra_sbatch,
    ]
    return options


def srun_options(job: Job) -> list[str]:
    """srun's options for the training step, shell-ready."""
    slurm = job.launcher.slurm
    options = ['--nodes="$SLURM_NNODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if slurm.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
        options.append('--cpus-per-task="$SLURM_CPUS_PER_TASK"')
    if slurm.container_image:
        # The scripts, the config and the checkpoints must be at the same paths inside.
        mounts = list(slurm.container_mounts)
        for path in dict.fromkeys((str(job.workdir), str(job.output_dir))):
            mounts.append(f"{path}:{path}")
        options += [
            f"--container-image={q(slurm.container_image)}",
            f"--container-mounts={q(','.join(mounts))}",
            f"--container-workdir={q(job.workdir)}",
        ]
    options += [q(arg) for arg in slurm.srun_args]
    return options


def master_port(job: Job) -> str:
    if job.launcher.port:
        return str(job.launcher.port)
    # Derived from the job id, so that two jobs sharing a node do not collide.
    return "$((20000 + SLURM_JOB_ID % 20000))"


def render_batch_script(job: Job) -> str:
    """The text of ``launch/job.sbatch`` for ``job``."""
    return fill(
        "job.sbatch",
        {
            "SBATCH_LINES": block(f"#SBATCH {option}" for option in sbatch_options(job)),
            "JOB_SCRIPT_PATH": str(job.batch_script),
            "SIGNAL_LEAD": str(job.launcher.slurm.signal_lead),
            "WORKDIR": q(job.workdir),
            "OUTPUT_DIR": q(job.output_dir),
            "LAUNCH_DIR": q(job.launch_dir),
            "REQUEUE_FILENAME": REQUEUE_FILENAME,
            "FAILURE_REQUEUES": str(job.launcher.slurm.failure_requeues),
            "MASTER_PORT": master_port(job),
            "SRUN_ARGS": block(f"  {option} \\" for option in srun_options(job)),
        },
    )


def submit_command(job: Job) -> list[str]:
    return ["sbatch", str(job.batch_script)]


def submit(job: Job) -> int:
    """Creates the log folder (Slurm does not, and fails the job without a word) and runs sbatch."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.call(submit_command(job))
    except FileNotFoundError:
        print("sfd-launch: error: sbatch not found: run this on a Slurm login node (or use --dry-run)", file=sys.stderr)
        return 127
