"""Cluster settings used by sfd-launch (the ``launcher:`` section of a job config).

The trainer ignores this section. Every key can also be given on the command line as
``launcher.key=value`` (values in YAML syntax); the common ones have flags as well
(``sfd-launch slurm --help``).

``ConfigError`` is imported inside the ``validate`` methods, not at the top:
``sfd_train.config`` imports this module while it loads (schema.py), so a top-level
import would be circular whenever the launchers are imported first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds,
# days-hours, days-hours:minutes, days-hours:minutes:seconds.
_SLURM_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")


@dataclass
class SlurmConfig:
    """sbatch/srun settings (sfd-launch slurm)."""

    partition: str = ""
    """Partition (#SBATCH --partition); '' = the cluster's default."""
    account: str = ""
    """Account charged for the job (#SBATCH --account); '' = your default."""
    qos: str = ""
    """Quality of service (#SBATCH --qos); '' = the default."""
    time: int | str = ""
    """Wall-time limit, quoted in YAML ('4:00:00', '2-00:00:00', '240' minutes); '' = the partition's.
    Unquoted 4:00:00 is read by YAML as the number 14400 and rejected."""
    job_name: str = ""
    """Job name (#SBATCH --job-name); '' = run.name."""
    min_nodes: int = 0
    """Accept any allocation from this many nodes up to launcher.nodes (#SBATCH --nodes=MIN-MAX): the job
    starts sooner, and a requeued job may come back on fewer or more nodes. At every start the mesh (HSDP:
    one shard group per node), the per-rank micro-batch and the accumulation follow the nodes granted,
    keeping train.global_batch_size and the data order; every count in the range is checked at submission.
    0 = exactly launcher.nodes."""
    cpus_per_task: int = 0
    """CPUs for the one task per node, i.e. for all its workers and data loaders; 0 = the cluster's default."""
    gres: str = "auto"
    """Device request: 'auto' = --gpus-per-node=G (cuda) or --gres=npu:G (npu), 'none' = no request,
    anything else is written as --gres=<value> (e.g. gpu:a100:8)."""
    signal_lead: int = 90
    """Slurm sends SIGUSR2 to the batch shell this many seconds before the time limit (--signal=B:USR2@N)."""
    failure_requeues: int = 3
    """Requeue the job after a failure that left no REQUEUE file (a lost node, a hung collective) at most
    this many times in a row; a clean preemption requeue resets the count. 0 = never."""
    log_dir: str = ""
    """Folder of the Slurm logs (slurm-<jobid>.out/.err, appended across requeues); '' = <run.output_dir>/logs."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More #SBATCH options, one per item, e.g. ['--exclusive', '--mem=0', '--constraint=h100']."""
    srun_args: list[str] = field(default_factory=list)
    """More srun options for the training step, e.g. ['--cpu-bind=none']."""
    container_image: str = ""
    """Container image for the training step (pyxis/enroot: srun --container-image); '' = no container."""
    container_mounts: list[str] = field(default_factory=list)
    """Extra container mounts 'src:dst[:flags]'; the working directory and run.output_dir are always mounted
    at the same paths."""

    def validate(self) -> None:
        from sfd_train.config.base import ConfigError  # noqa: PLC0415  (see the module docstring)

        if isinstance(self.time, int):
            raise ConfigError(
                "time",
                f"got the number {self.time}: unquoted YAML reads 4:00:00 as 14400 seconds; quote Slurm times "
                "(time: '4:00:00', launcher.slurm.time=\"'4:00:00'\" or --time 4:00:00)",
            )
        if self.time and not _SLURM_TIME.match(self.time):
            raise ConfigError("time", f"{self.time!r} is not a Slurm time such as 4:00:00, 2-00:00:00 or 240")
        if self.cpus_per_task < 0:
            raise ConfigError("cpus_per_task", f"must be >= 0, got {self.cpus_per_task}")
        if self.min_nodes < 0:
            raise ConfigError("min_nodes", f"must be >= 0 (0 = exactly launcher.nodes), got {self.min_nodes}")
        if not 1 <= self.signal_lead <= 65535:
            raise ConfigError("signal_lead", f"must be in [1, 65535] seconds, got {self.signal_lead}")
        if self.failure_requeues < 0:
            raise ConfigError("failure_requeues", f"must be >= 0, got {self.failure_requeues}")
        for i, line in enumerate(self.extra_sbatch):
            if not line.startswith("-") or "\n" in line:
                raise ConfigError(f"extra_sbatch[{i}]", f"{line!r} must be one sbatch option such as --exclusive")
        for i, arg in enumerate(self.srun_args):
            if not arg.startswith("-"):
                raise ConfigError(f"srun_args[{i}]", f"{arg!r} must be an srun option such as --cpu-bind=none")
        for i, mount in enumerate(self.container_mounts):
            if ":" not in mount or "," in mount:
                raise ConfigError(f"container_mounts[{i}]", f"{mount!r} must look like /src:/dst[:ro]")
        if self.container_mounts and not self.container_image:
            raise ConfigError("container_mounts", "set container_image too (mounts apply to a container)")


@dataclass
class AscendConfig:
    """CANN/HCCL/NPU settings (sfd-launch ascend, and slurm with accelerator npu)."""

    cann_set_env: str = ""
    """CANN set_env.sh to source on every node; '' = the first of /usr/local/Ascend/ascend-toolkit/set_env.sh
    and /usr/local/Ascend/cann/set_env.sh that exists."""
    hccl_connect_timeout: int = 1200
    """HCCL_CONNECT_TIMEOUT: seconds to wait for peers when links are set up (CANN allows 120..7200)."""
    hccl_exec_timeout: int = 1800
    """HCCL_EXEC_TIMEOUT: seconds a collective may wait for a slower rank, e.g. one saving (0 = never on A2/A3)."""
    hccl_if_ip: str = "auto"
    """HCCL_IF_IP: host address for HCCL set-up; 'auto' = the source address of the route to the master node
    (only when launcher.socket_ifname is empty, since HCCL_IF_IP takes precedence); '' = not exported;
    an address fits single-node runs only."""
    visible_devices: str = ""
    """ASCEND_RT_VISIBLE_DEVICES; '' = keep the value the cluster set, else 0..devices_per_node-1."""
    task_queue_enable: int = 2
    """TASK_QUEUE_ENABLE: operator dispatch pipeline level (0 off, 1, 2 = most overlap)."""
    cpu_affinity_conf: str = "1"
    """CPU_AFFINITY_CONF: 0 off, 1 coarse, 2 fine core binding, optionally with npuN:a-b ranges."""
    npu_alloc_conf: str = "expandable_segments:True"
    """PYTORCH_NPU_ALLOC_CONF of the NPU caching allocator ('' = not exported)."""
    combined_enable: bool = True
    """COMBINED_ENABLE=1: fuse the copies of non-contiguous tensors."""
    hccl_whitelist_disable: bool = True
    """HCCL_WHITELIST_DISABLE=1: no HCCL trust-list check between hosts."""
    rank_table_file: str = ""
    """RANK_TABLE_FILE (JSON rank table) for table-based HCCL set-up; '' = negotiated. With a table the nodes
    use static ranks (node rank x devices + local rank), which must match the table."""
    mindspeed: bool = False
    """Use MindSpeed: checked importable on every node, then SFD_ENABLE_MINDSPEED=1 is exported."""

    def validate(self) -> None:
        from sfd_train.config.base import ConfigError  # noqa: PLC0415  (see the module docstring)

        if not 120 <= self.hccl_connect_timeout <= 7200:
            raise ConfigError("hccl_connect_timeout", f"must be in [120, 7200] seconds, got {self.hccl_connect_timeout}")
        if self.hccl_exec_timeout < 0:
            raise ConfigError("hccl_exec_timeout", f"must be >= 0, got {self.hccl_exec_timeout}")
        if self.hccl_if_ip not in ("auto", "") and not _IPV4.match(self.hccl_if_ip) and ":" not in self.hccl_if_ip:
            raise ConfigError("hccl_if_ip", f"{self.hccl_if_ip!r} is not 'auto', '' or an IP address")
        if self.task_queue_enable not in (0, 1, 2):
            raise ConfigError("task_queue_enable", f"must be 0, 1 or 2, got {self.task_queue_enable}")
        if self.visible_devices and not re.match(r"^\d+(,\d+)*$", self.visible_devices):
            raise ConfigError("visible_devices", f"{self.visible_devices!r} must be device ids such as 0,1,2,3")


@dataclass
class LauncherConfig:
    """Cluster settings for sfd-launch (ignored by sfd-train itself)."""

    nodes: int = 1
    """Number of nodes."""
    devices_per_node: int | None = None
    """Processes (GPUs or NPUs) per node; null = all accelerators of this machine for `local`
    (1 process without any), 8 for slurm and ascend, whose nodes are not visible when the script is written."""
    accelerator: Literal["cuda", "npu", "cpu"] = "cuda"
    """What the cluster nodes compute on: CUDA GPUs, Ascend NPUs (CANN environment, hccl), or CPUs (gloo)."""
    device: str = ""
    """The accelerator model, for the plan sfd-launch makes before it starts or submits the job (memory per
    device, step time, data bandwidth; a job that cannot fit is refused, --no-plan skips it): h100, h200,
    a100-40g, a100-80g, 910b, or the device memory in GiB (e.g. 75); '' = no plan. See `sfd-launch plan`."""
    env_setup: list[str] = field(default_factory=list)
    """Shell lines run before training on every node (module loads, conda activate, ...)."""
    env: dict[str, Any] = field(default_factory=dict)
    """Environment variables exported on every node, e.g. {NCCL_DEBUG: WARN} (true/false become 1/0)."""
    python: str = "python"
    """Python interpreter on the nodes (after env_setup) with sfd-train installed: it works out the layout for
    the nodes granted (mesh, micro-batch, accumulation), logs versions and checks MindSpeed."""
    torchrun: str = "torchrun"
    """torchrun executable on the nodes (after env_setup)."""
    entrypoint: str = "sfd_train.train"
    """What torchrun runs: a module (run with -m) or a script ending in .py."""
    port: int = 0
    """Rendezvous port on the first node; 0 = 20000 + job id mod 20000 under Slurm (two jobs sharing a node
    do not collide), 29500 otherwise."""
    master_addr: str = ""
    """Address of node 0 for multi-node `ascend` runs without Slurm (or --master-addr)."""
    socket_ifname: str = ""
    """Network interface(s) for the bootstrap sockets: exported as GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME
    or HCCL_SOCKET_IFNAME; '' = the libraries choose."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """sbatch/srun settings."""
    ascend: AscendConfig = field(default_factory=AscendConfig)
    """CANN/HCCL/NPU settings."""

    def validate(self) -> None:
        from sfd_train.config.base import ConfigError  # noqa: PLC0415  (see the module docstring)

        if self.nodes < 1:
            raise ConfigError("nodes", f"must be >= 1, got {self.nodes}")
        if self.slurm.min_nodes > self.nodes:
            raise ConfigError(
                "slurm.min_nodes", f"{self.slurm.min_nodes} is more than launcher.nodes ({self.nodes}), the most the job asks for"
            )
        if self.devices_per_node is not None and self.devices_per_node < 1:
            raise ConfigError("devices_per_node", f"must be >= 1 (or null for auto), got {self.devices_per_node}")
        if self.device != "":
            from sfd_train.planning.devices import resolve_device  # noqa: PLC0415  (see the module docstring)

            try:
                resolve_device(self.device, self.accelerator)
            except ValueError as err:
                raise ConfigError("device", str(err)) from None
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in [0, 65535], got {self.port}")
        for name, value in self.env.items():
            if not _ENV_NAME.match(str(name)):
                raise ConfigError(f"env.{name}", "is not a valid environment variable name")
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"env.{name}", f"must be a string or a number, got {value!r}")
        for i, line in enumerate(self.env_setup):
            if "\n" in line:
                raise ConfigError(f"env_setup[{i}]", "one shell line per item (no newlines)")
        if self.ascend.hccl_if_ip not in ("auto", "") and self.nodes > 1:
            raise ConfigError(
                "ascend.hccl_if_ip",
                "one address cannot serve several nodes: use 'auto' (or launcher.socket_ifname) for multi-node runs",
            )
        for key in ("python", "torchrun", "entrypoint"):
            if not getattr(self, key).strip():
                raise ConfigError(key, "must not be empty")

    def node_counts(self) -> range:
        """Every number of nodes a Slurm job may be granted: min_nodes..nodes (just nodes without min_nodes)."""
        return range(self.slurm.min_nodes or self.nodes, self.nodes + 1)

    def nproc_per_node(self) -> int:
        """Processes per cluster node (``devices_per_node``, 8 when left automatic)."""
        return self.devices_per_node if self.devices_per_node is not None else 8
