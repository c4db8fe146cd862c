"""The per-node script (``launch/node.sh``): environment, version log, torchrun.

Slurm runs it once per node through srun; on Ascend clusters without Slurm the user
runs it on every node through ``sfd-launch ascend --node-rank R``. The file is the
same for every node, so all nodes may render it into a shared run folder at once.
"""

from __future__ import annotations

from sfd_train.launchers import ascend
from sfd_train.launchers.contract import REQUEUE_FILENAME, SETUP_ERROR_EXIT_CODE
from sfd_train.launchers.job import Job
from sfd_train.launchers.render import block, fill, q

DEFAULT_PORT = 29500

# Settings worth seeing in the log of every node (never the whole environment:
# it may hold credentials such as WANDB_API_KEY).
_LOGGED_ENV = (
    "CUDA_VISIBLE_DEVICES|NCCL_|GLOO_|HCCL_|ASCEND_|RANK_TABLE_FILE|TASK_QUEUE_ENABLE|CPU_AFFINITY_CONF|"
    "PYTORCH_|COMBINED_ENABLE|OMP_NUM_THREADS|SFD_"
)

_DEVICE_REPORT = {
    "cuda": [
        "if command -v nvidia-smi >/dev/null 2>&1; then",
        "  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/  /'",
        "fi",
    ],
    "npu": [
        "if command -v npu-smi >/dev/null 2>&1; then",
        "  npu-smi info 2>&1 | sed 's/^/  /'",
        "fi",
    ],
    "cpu": ['log "$(nproc) CPU cores available"'],
}


def rendezvous(job: Job) -> str:
    """'c10d' (dynamic, torchrun assigns node ranks) or 'static' (node rank given per node).

    Slurm jobs use c10d on the first node, as torchrun recommends. Runs without Slurm,
    and runs with an HCCL rank table (whose rank ids must equal node rank x devices +
    local rank), need ranks fixed in advance: static.
    """
    if job.mode == "slurm" and not (job.accelerator == "npu" and job.launcher.ascend.rank_table_file):
        return "c10d"
    return "static"


def default_port(job: Job) -> str:
    """The port inside the script when SFD_MASTER_PORT is not set."""
    return str(job.launcher.port or DEFAULT_PORT)


def torchrun_args(job: Job) -> list[str]:
    """torchrun's command line after the executable, one shell-ready item per line."""
    args = ['--nnodes="$NNODES"', f"--nproc-per-node={job.nproc_per_node}"]
    if rendezvous(job) == "c10d":
        args += [
            "--rdzv-backend=c10d",
            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
            '--rdzv-id="$RDZV_ID"',
        ]
    else:
        args += ['--node-rank="$NODE_RANK"', '--master-addr="$MASTER_ADDR"', '--master-port="$MASTER_PORT"']
    args.append("--max-restarts=0")
    # LAYOUT_WORDS: the mesh for the nodes this job was given (set in the script).
    args.append(" ".join(q(a) for a in job.trainer_args()) + ' "${LAYOUT_WORDS[@]}"')
    return args


def env_setup_lines(job: Job) -> list[str]:
    """launcher.env_setup, run in a function so that one failure check covers it."""
    lines = job.launcher.env_setup
    if not lines:
        return []
    return [
        "# ---- launcher.env_setup ----",
        "# The lines may source files and read unset variables (conda, modules).",
        "# shellcheck disable=SC1090,SC1091",
        "env_setup() {",
        *(f"  {line}" for line in lines),
        "}",
        "set +u",
        'env_setup || die "launcher.env_setup failed (status $?)"',
        "set -u",
    ]


def user_env_lines(job: Job) -> list[str]:
    """launcher.env, exported last so that it wins over every default above it."""
    env = job.launcher.env
    if not env:
        return []
    lines = ["# ---- launcher.env ----"]
    for name, value in env.items():
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        lines.append(f"export {name}={q(text)}")
    return lines


def socket_lines(job: Job) -> list[str]:
    ifname = job.launcher.socket_ifname
    if not ifname:
        return []
    own = {"cuda": "NCCL_SOCKET_IFNAME", "npu": "HCCL_SOCKET_IFNAME", "cpu": None}[job.accelerator]
    lines = ["# ---- network interface for the bootstrap sockets (launcher.socket_ifname) ----"]
    if own:
        lines.append(f"export {own}={q(ifname)}")
    lines.append(f"export GLOO_SOCKET_IFNAME={q(ifname)}")
    return lines


def env_block(job: Job) -> str:
    """Everything between `cd` and the version log, in the order it must run."""
    sections: list[list[str]] = []
    if job.accelerator == "npu":
        # CANN first: the user's lines (conda activate, ...) and our exports build on it.
        sections.append(ascend.cann_lines(job))
    sections.append(env_setup_lines(job))
    sections.append(socket_lines(job))
    if job.accelerator == "npu":
        sections.append(ascend.runtime_lines(job))
    sections.append(user_env_lines(job))
    if job.accelerator == "npu" and job.launcher.ascend.mindspeed:
        sections.append(ascend.mindspeed_lines(job))
    return "\n\n".join(block(s) for s in sections if s)


def render_node_script(job: Job) -> str:
    """The text of ``launch/node.sh`` for ``job``."""
    args = torchrun_args(job)
    arg_lines = [f"    {a} \\" for a in args[:-1]] + [f"    {args[-1]}"]
    return fill(
        "node.sh",
        {
            "MODE": job.mode,
            "NPROC": str(job.nproc_per_node),
            "NNODES": str(job.launcher.nodes),
            "PORT": default_port(job),
            "SETUP_ERROR": str(SETUP_ERROR_EXIT_CODE),
            "WORKDIR": q(job.workdir),
            "OUTPUT_DIR": q(job.output_dir),
            "REQUEUE_FILENAME": REQUEUE_FILENAME,
            "SETUP_ERROR_FILE": q(job.launch_dir / "SETUP_ERROR"),
            "CONFIG_FILE": q(job.config_file),
            "LAYOUT_FILE": q(job.launch_dir / "layout"),
            "PYTHON": q(job.launcher.python),
            "TORCHRUN": q(job.launcher.torchrun),
            "ENV_BLOCK": env_block(job),
            "LOGGED_ENV": _LOGGED_ENV,
            "DEVICE_REPORT": block(_DEVICE_REPORT[job.accelerator]),
            "TORCHRUN_ARGS": block(arg_lines),
            "RENDEZVOUS": rendezvous(job),
            "RDZV_ID_LINE": 'RDZV_ID="${SFD_RDZV_ID:-${SLURM_JOB_ID:-sfd}}"' if rendezvous(job) == "c10d" else "",
        },
    )
