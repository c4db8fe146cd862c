"""Ascend NPU nodes: the CANN environment, HCCL and NPU runtime settings, MindSpeed.

The shell blocks here go into ``launch/node.sh`` for ``sfd-launch ascend`` and for
``sfd-launch slurm`` with ``launcher.accelerator: npu``. Without Slurm, Ascend users
start one command per node (``--node-rank R --master-addr HOST``), as the MindSpeed
launch scripts do; :func:`node_command` builds it.

Variable names and ranges follow the CANN and Ascend Extension for PyTorch
environment-variable references (HCCL_CONNECT_TIMEOUT in [120, 7200] s, HCCL_IF_IP
taking precedence over HCCL_SOCKET_IFNAME, RANK_TABLE_FILE for table-based set-up,
TASK_QUEUE_ENABLE 0/1/2, CPU_AFFINITY_CONF 0/1/2).
"""

from __future__ import annotations

from pathlib import Path

from sfd_train.config import ConfigError
from sfd_train.launchers.contract import MINDSPEED_ENV
from sfd_train.launchers.job import Job
from sfd_train.launchers.render import q

CANN_SET_ENV_PATHS = (
    "/usr/local/Ascend/ascend-toolkit/set_env.sh",
    "/usr/local/Ascend/cann/set_env.sh",
)
"""Where CANN installs its environment script (toolkit layout, then the newer cann layout)."""


def cann_lines(job: Job) -> list[str]:
    """Source the first CANN set_env.sh that exists; a clear error naming the paths tried if none."""
    configured = job.launcher.ascend.cann_set_env
    candidates = [configured] if configured else list(CANN_SET_ENV_PATHS)
    hint = (
        "fix launcher.ascend.cann_set_env"
        if configured
        else "install the CANN toolkit, or point launcher.ascend.cann_set_env at its set_env.sh"
    )
    tried = " ".join(candidates)
    return [
        "# ---- Ascend CANN environment ----",
        f"CANN_CANDIDATES=({' '.join(q(c) for c in candidates)})",
        'CANN_SET_ENV=""',
        'for candidate in "${CANN_CANDIDATES[@]}"; do',
        '  if [ -f "$candidate" ]; then',
        '    CANN_SET_ENV=$candidate',
        "    break",
        "  fi",
        "done",
        'if [ -z "$CANN_SET_ENV" ]; then',
        f'  die {q(f"no CANN environment on this node: tried {tried} ({hint})")}',
        "fi",
        "# set_env.sh reads variables that may be unset.",
        "set +u",
        "# shellcheck source=/dev/null",
        'source "$CANN_SET_ENV" || die "sourcing $CANN_SET_ENV failed"',
        "set -u",
        'log "CANN environment: $CANN_SET_ENV"',
    ]


def _if_ip_lines(job: Job) -> list[str]:
    settings = job.launcher.ascend
    if settings.hccl_if_ip == "":
        return []
    if settings.hccl_if_ip != "auto":
        return [f"export HCCL_IF_IP={q(settings.hccl_if_ip)}"]
    if job.launcher.socket_ifname:
        # HCCL_IF_IP would override the interface the user chose.
        return []
    return [
        "# HCCL_IF_IP: the address the other nodes reach this one on, i.e. the source",
        "# address of the route towards the master node (HCCL wants an address, not a",
        "# name). A value the cluster already set is kept.",
        "route_source_ip() {",
        "  local target addr",
        "  target=$(getent ahostsv4 \"$1\" 2>/dev/null | awk 'NR == 1 {print $1}')",
        "  addr=$(ip -4 route get \"${target:-$1}\" 2>/dev/null"
        " | awk '{for (i = 1; i < NF; i++) if ($i == \"src\") {print $(i + 1); exit}}')",
        '  if [ -z "$addr" ]; then',
        "    addr=$(hostname -I 2>/dev/null | awk '{print $1}')",
        "  fi",
        "  printf '%s\\n' \"$addr\"",
        "}",
        'if [ -z "${HCCL_IF_IP:-}" ]; then',
        '  HCCL_IF_IP=$(route_source_ip "$MASTER_ADDR")',
        "fi",
        'if [ -n "$HCCL_IF_IP" ]; then',
        "  export HCCL_IF_IP",
        "else",
        "  unset HCCL_IF_IP",
        '  log "warning: no address found for HCCL_IF_IP; HCCL chooses an interface itself"',
        "fi",
    ]


def runtime_lines(job: Job) -> list[str]:
    """The HCCL and NPU runtime exports."""
    settings = job.launcher.ascend
    devices = settings.visible_devices or ",".join(str(i) for i in range(job.nproc_per_node))
    visible = (
        f"export ASCEND_RT_VISIBLE_DEVICES={q(devices)}"
        if settings.visible_devices
        # Keep what the cluster (or its Slurm gres plugin) set for this node.
        else f'export ASCEND_RT_VISIBLE_DEVICES="${{ASCEND_RT_VISIBLE_DEVICES:-{devices}}}"'
    )
    lines = [
        "# ---- HCCL and NPU runtime (launcher.ascend) ----",
        f"export HCCL_CONNECT_TIMEOUT={settings.hccl_connect_timeout}",
        f"export HCCL_EXEC_TIMEOUT={settings.hccl_exec_timeout}",
        f"export HCCL_WHITELIST_DISABLE={int(settings.hccl_whitelist_disable)}",
        *_if_ip_lines(job),
        visible,
        f"export TASK_QUEUE_ENABLE={settings.task_queue_enable}",
        f"export CPU_AFFINITY_CONF={q(settings.cpu_affinity_conf)}",
        f"export COMBINED_ENABLE={int(settings.combined_enable)}",
    ]
    if settings.npu_alloc_conf:
        lines.append(f"export PYTORCH_NPU_ALLOC_CONF={q(settings.npu_alloc_conf)}")
    if settings.rank_table_file:
        lines += [
            "# Table-based HCCL set-up; ranks are static (node rank x devices + local rank).",
            f"export RANK_TABLE_FILE={q(settings.rank_table_file)}",
            '[ -f "$RANK_TABLE_FILE" ] || die "rank table $RANK_TABLE_FILE not found (launcher.ascend.rank_table_file)"',
        ]
    return lines


def mindspeed_lines(job: Job) -> list[str]:
    """Check that MindSpeed imports on this node, then tell the trainer to enable it."""
    return [
        "# ---- MindSpeed (launcher.ascend.mindspeed) ----",
        "if ! mindspeed_error=$(\"$PYTHON\" -c 'import mindspeed' 2>&1); then",
        '  die "launcher.ascend.mindspeed is true but $PYTHON cannot import mindspeed:'
        ' $(printf \'%s\\n\' "$mindspeed_error" | tail -n 1)'
        ' (install MindSpeed on the nodes, or set launcher.ascend.mindspeed=false)"',
        "fi",
        "# The trainer imports mindspeed.megatron_adaptor (before building the model) when this is 1.",
        f"export {MINDSPEED_ENV}=1",
    ]


def node_command(job: Job, node_rank: int | None, master_addr: str | None) -> tuple[dict[str, str], list[str]]:
    """The environment and command that run ``node.sh`` on this node, without Slurm.

    Raises:
        ConfigError: a multi-node run without the master address or this node's rank.
    """
    nodes = job.launcher.nodes
    master = master_addr or job.launcher.master_addr
    if nodes > 1:
        if not master:
            raise ConfigError("launcher.master_addr", f"a {nodes}-node run needs node 0's address (--master-addr HOST)")
        if node_rank is None:
            raise ConfigError("", f"a {nodes}-node run needs this node's rank: --node-rank 0..{nodes - 1}")
    node_rank = 0 if node_rank is None else node_rank
    if not 0 <= node_rank < nodes:
        raise ConfigError("", f"--node-rank {node_rank} is outside 0..{nodes - 1} (launcher.nodes={nodes})")
    env = {
        "SFD_NNODES": str(nodes),
        "SFD_NODE_RANK": str(node_rank),
        "SFD_MASTER_ADDR": master or "127.0.0.1",
        "SFD_MASTER_PORT": str(job.launcher.port or 29500),
    }
    return env, ["bash", str(job.node_script)]


def check_node_files(job: Job) -> None:
    """Files this node must see before anything starts (a real launch, not a dry run)."""
    table = job.launcher.ascend.rank_table_file
    if table and not Path(table).is_file():
        raise ConfigError("launcher.ascend.rank_table_file", f"{table} does not exist on this node")
