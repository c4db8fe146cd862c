"""sfd-launch: start sfd-train on this machine, a Slurm cluster or Ascend NPU nodes.

The whole job config (launcher section included) is loaded and validated before
anything is written, submitted or started; errors name the key at fault.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any, Sequence

from sfd_train.config import Config, ConfigError, from_mapping, load_config, to_dict
from sfd_train.config.base import describe
from sfd_train.config.loader import parse_args_with_overrides
from sfd_train.launchers import ascend, local, slurm
from sfd_train.launchers.config import LauncherConfig
from sfd_train.launchers.job import Job, build_job
from sfd_train.launchers.node import render_node_script
from sfd_train.launchers.render import join_words, write_script

MODES = {
    "local": "torchrun on this machine",
    "slurm": "write <run.output_dir>/launch/job.sbatch (+ node.sh) and submit it with sbatch",
    "ascend": "run torchrun on this Ascend node with CANN and HCCL set up (one command per node)",
    "plan": "memory per device, step time and data bandwidth of the job as the other modes run it (CPU, no GPU)",
}

USAGE = "sfd-launch {local,slurm,ascend,plan} CONFIG [key=value ...] [options]"

HELP = f"""usage: {USAGE}

Start sfd-train on this machine, a Slurm cluster, or Ascend NPU nodes.

modes:
{chr(10).join(f"  {name:8} {text}" for name, text in MODES.items())}

CONFIG is a YAML file or a preset in configs/ (e.g. tiny). key=value overrides any
config key, the launcher section included (launcher.nodes=4,
launcher.slurm.partition=gpu); flags win over both. --dry-run writes the scripts and
prints exactly what would run, without running it. With launcher.device (or --device) set,
local, slurm and ascend plan the job first and refuse one that cannot fit (exit 2);
--no-plan skips that.

  sfd-launch MODE --help     flags of a mode
  sfd-launch --help-config   every launcher.* key with its default

examples:
  sfd-launch local tiny --nproc-per-node 2
  sfd-launch slurm configs/sfd_xl.yaml --nodes 4 --partition gpu --time 4:00:00 --dry-run
  sfd-launch slurm configs/sfd_xl.yaml --nodes 2 --accelerator npu      # Slurm on Ascend
  sfd-launch ascend configs/sfd_xl.yaml --nodes 2 --node-rank 0 --master-addr 10.0.0.1
  sfd-launch plan sfd_xl --nodes 32 --devices-per-node 8 --device h100 --json
"""

# Flag destination -> path of the launcher key it sets.
_FLAG_KEYS = {
    "nodes": ("nodes",),
    "devices_per_node": ("devices_per_node",),
    "accelerator": ("accelerator",),
    "device": ("device",),
    "env_setup": ("env_setup",),
    "partition": ("slurm", "partition"),
    "account": ("slurm", "account"),
    "qos": ("slurm", "qos"),
    "time": ("slurm", "time"),
    "container_image": ("slurm", "container_image"),
    "master_addr": ("master_addr",),
    "master_port": ("port",),
    "rank_table": ("ascend", "rank_table_file"),
    "cann_set_env": ("ascend", "cann_set_env"),
}


def _parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"sfd-launch {mode}",
        description=f"sfd-launch {mode}: {MODES[mode]}. Settings come from the config's launcher section, "
        "key=value overrides and these flags (which win).",
    )
    parser.add_argument("config", help="YAML file or preset name in configs/ (e.g. tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=1000")
    parser.add_argument("--device", metavar="NAME",
                        help="launcher.device: h100, h200, a100-40g, a100-80g, 910b, or the memory in GiB (e.g. 75)")
    if mode == "plan":
        parser.add_argument("--nodes", type=int, metavar="N", help="launcher.nodes")
        parser.add_argument("--devices-per-node", "--nproc-per-node", dest="devices_per_node", type=int, metavar="G",
                            help="launcher.devices_per_node (default 8)")
        parser.add_argument("--json", action="store_true", help="print the plan as JSON (keys: docs/planning.md)")
        parser.epilog = ("The plan traces one training step on fake tensors and a fake process group of the job's "
                         "size (no GPU, no memory), with the launcher's mesh and batch split. docs/planning.md.")
        return parser
    parser.add_argument("--dry-run", action="store_true", help="print exactly what would run (after the plan); start nothing")
    parser.add_argument("--no-plan", action="store_true",
                        help="do not plan the job first, even with launcher.device set (and so never refuse it)")
    if mode == "local":
        parser.add_argument(
            "--nproc-per-node", "--devices-per-node", dest="devices_per_node", type=int, metavar="N",
            help="processes (default: launcher.devices_per_node, else every GPU/NPU here, else 1)",
        )
        return parser
    parser.add_argument("--nodes", type=int, metavar="N", help="launcher.nodes")
    parser.add_argument(
        "--devices-per-node", "--nproc-per-node", dest="devices_per_node", type=int, metavar="G",
        help="launcher.devices_per_node (default 8)",
    )
    parser.add_argument(
        "--env-setup", action="append", metavar="LINE",
        help="shell line run on every node before training (repeatable; added to launcher.env_setup)",
    )
    if mode == "slurm":
        parser.add_argument("--accelerator", choices=["cuda", "npu", "cpu"], help="launcher.accelerator (npu: Slurm on Ascend)")
        parser.add_argument("--partition", help="launcher.slurm.partition")
        parser.add_argument("--account", help="launcher.slurm.account")
        parser.add_argument("--qos", help="launcher.slurm.qos")
        parser.add_argument("--time", metavar="TIME", help="launcher.slurm.time, e.g. 4:00:00 or 2-00:00:00")
        parser.add_argument("--container-image", metavar="IMAGE", help="launcher.slurm.container_image (pyxis)")
    if mode == "ascend":
        parser.add_argument("--node-rank", type=int, metavar="R", help="rank of this node, 0..nodes-1 (multi-node)")
        parser.add_argument("--master-addr", metavar="HOST", help="launcher.master_addr: address of node 0 (multi-node)")
        parser.add_argument("--master-port", type=int, metavar="PORT", help="launcher.port (default 29500)")
        parser.add_argument("--rank-table", metavar="JSON", help="launcher.ascend.rank_table_file")
        parser.add_argument("--cann-set-env", metavar="PATH", help="launcher.ascend.cann_set_env")
    return parser


def apply_flags(config: Config, args: argparse.Namespace) -> Config:
    """Returns ``config`` with the launcher keys the flags set, validated again."""
    data: dict[str, Any] = to_dict(config.launcher)
    changed = False
    for dest, path in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        section = data
        for name in path[:-1]:
            section = section[name]
        if dest == "env_setup":
            value = [*section[path[-1]], *value]
        section[path[-1]] = value
        changed = True
    if not changed:
        return config
    return replace(config, launcher=from_mapping(LauncherConfig, data, prefix="launcher"))


def _write_files(job: Job, texts: dict[str, str]) -> None:
    job.freeze_config()
    for name, text in texts.items():
        write_script(job.launch_dir / name, text)


def _show(job: Job, texts: dict[str, str], command: str, dry_run: bool) -> None:
    """Prints what was written and the command that runs it (the scripts in full on a dry run)."""
    if dry_run:
        print(f"# sfd-launch {job.mode} --dry-run: files written, nothing started")
        print(f"# frozen config: {job.config_file}")
        for name, text in texts.items():
            print(f"\n# ===== {job.launch_dir / name} =====")
            print(text, end="" if text.endswith("\n") else "\n")
        print("\n# ===== command =====")
        print(command, flush=True)
        return
    print(f"sfd-launch {job.mode}: wrote {', '.join(str(job.launch_dir / n) for n in texts)} and {job.config_file}")
    print(f"$ {command}", flush=True)


def _plan(config: Config, args: argparse.Namespace) -> int:
    """sfd-launch plan: the job as the other modes would run it, on launcher.device."""
    import json

    from sfd_train.planning import resolve_device
    from sfd_train.planning.plan import plan_job

    launcher = config.launcher
    if launcher.device == "":
        raise ConfigError("launcher.device", "sfd-launch plan needs a device: --device h100 (h200, a100-40g, a100-80g, "
                          "910b, or the memory in GiB), or launcher.device in the config")
    plan = plan_job(config, launcher.nodes, launcher.nproc_per_node(), resolve_device(launcher.device, launcher.accelerator))
    print(json.dumps(plan.to_json(), indent=1) if args.json else plan.summary(), flush=True)
    return 0


def _fits(job: Job, args: argparse.Namespace) -> bool:
    """Plans the job first when launcher.device is set (not with --no-plan) and prints the plan; False when
    it cannot fit, after saying so. A Slurm job that may get fewer nodes is planned on the fewest: its
    ranks then hold the most images."""
    launcher = job.launcher
    if args.no_plan or launcher.device == "":
        return True
    from sfd_train.planning import resolve_device
    from sfd_train.planning.plan import plan_job

    nodes = launcher.node_counts()[0] if job.mode == "slurm" else launcher.nodes
    plan = plan_job(job.config, nodes, job.nproc_per_node, resolve_device(launcher.device, job.accelerator))
    print("\n".join(f"# {line}" for line in plan.summary().splitlines()), flush=True)
    if plan.fits:
        return True
    print(f"sfd-launch {job.mode}: refused, nothing {'started' if job.mode != 'slurm' else 'submitted'}: the job "
          f"{plan.verdict()}. (--no-plan launches it anyway.)", file=sys.stderr, flush=True)
    return False


def _local(config: Config, args: argparse.Namespace) -> int:
    launcher = config.launcher
    nproc = launcher.devices_per_node or local.count_local_devices()
    job = build_job(config, "local", nproc_per_node=nproc)  # checks the batch split
    if not _fits(job, args):
        return 2
    cmd = local.command(args.config, args.overrides, launcher, nproc)
    env = local.environment(launcher)
    line = join_words([*(f"{k}={v}" for k, v in env.items()), *cmd])
    if args.dry_run:
        print(line, flush=True)
        return 0
    print(f"$ {line}", flush=True)
    local.run(cmd, env)
    return 0  # not reached: run() execs


def _slurm(config: Config, args: argparse.Namespace) -> int:
    job = build_job(config, "slurm")
    if not _fits(job, args):
        return 2
    texts = {"job.sbatch": slurm.render_batch_script(job), "node.sh": render_node_script(job)}
    _write_files(job, texts)
    _show(job, texts, join_words(slurm.submit_command(job)), args.dry_run)
    if args.dry_run:
        return 0
    return slurm.submit(job)


def _ascend(config: Config, args: argparse.Namespace) -> int:
    job = build_job(config, "ascend")
    if not _fits(job, args):
        return 2
    env, cmd = ascend.node_command(job, args.node_rank, args.master_addr)
    if not args.dry_run:
        ascend.check_node_files(job)
    texts = {"node.sh": render_node_script(job)}
    _write_files(job, texts)
    _show(job, texts, join_words([*(f"{k}={v}" for k, v in env.items()), *cmd]), args.dry_run)
    if args.dry_run:
        return 0
    local.run(cmd, env)
    return 0  # not reached


def config_help() -> str:
    lines = []
    for key, type_name, default, doc in describe(LauncherConfig, "launcher"):
        lines.append(f"  {key} ({type_name}, default {default!r})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0 if argv else 2
    if argv[0] == "--help-config":
        print(config_help())
        return 0
    mode = argv[0]
    if mode not in MODES:
        print(f"usage: {USAGE}\nsfd-launch: error: unknown mode {mode!r} (choose local, slurm, ascend or plan)", file=sys.stderr)
        return 2
    args = parse_args_with_overrides(_parser(mode), argv[1:])
    try:
        config = apply_flags(load_config(args.config, args.overrides), args)
        return {"local": _local, "slurm": _slurm, "ascend": _ascend, "plan": _plan}[mode](config, args)
    except ConfigError as err:
        print(f"sfd-launch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
