"""Train SFD: ``sfd-train CONFIG [key=value ...]`` or ``python -m sfd_train.train ...``.

Works as a single process and under torchrun on any number of ranks. Exit codes:
0 finished, 75 stopped for a requeue (checkpoint saved), 1 failed while training (the
line before says why), 2 bad input (config, data, a checkpoint this run cannot continue),
3 the run folder is in use by another job (see sfd_train.engine.run).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sfd_train.config import ConfigError, config_help, load_config
from sfd_train.safe_load import add_trust_argument, apply_trust_argument
from sfd_train.config.loader import parse_args_with_overrides
from sfd_train.config.registry import DEFAULT_TASK, describe_tasks, task_of_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfd-train",
        description="Train a Semantic-First Diffusion model. Resumes automatically from the newest complete "
        "checkpoint in run.output_dir. Also: `sfd-train export CKPT --out FILE.pt`.",
        epilog="examples:\n  sfd-train tiny\n  torchrun --nproc-per-node 2 -m sfd_train.train tiny parallel.strategy=ddp\n"
        "  sfd-train configs/sfd_xl.yaml data.path=s3://bucket/latents run.output_dir=/ckpt/xl\n"
        "exit codes: 0 done, 75 preempted and checkpointed (requeue me), 1 failed while training,\n"
        "  2 bad input (config, data, a checkpoint this run cannot continue), 3 run.output_dir is in use\n"
        "  by another job. SIGUSR2, SIGTERM and Ctrl-C checkpoint first; see docs/reliability.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="a YAML file (ours or the authors') or a preset in configs/ (e.g. tiny)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=1000")
    add_trust_argument(parser)
    parser.add_argument("--help-config", nargs="?", const=DEFAULT_TASK, metavar="TASK",
                        help="list every config key of a training task with its default and meaning. The tasks "
                        f"(`task: NAME` at the top of a YAML file selects one): {describe_tasks()}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    apply_trust_argument(args)
    if args.help_config:
        try:
            print(config_help(args.help_config))
        except ConfigError as err:
            print(f"sfd-train: {err}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        build_parser().error("a config is required (try: sfd-train tiny)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from sfd_train.engine.distributed import world_size_from_env

    try:
        notes: list[str] = []
        config = load_config(args.config, args.overrides, notes)
        for note in notes:
            logging.getLogger("sfd_train").info(f"note: {note}")
        # Everything that can be checked without a process group is checked here.
        if not config.data.path:
            raise ConfigError("data.path", "missing: set it to a shard folder or URL, or to 'synthetic'")
        config.parallel.check_world_size(world_size_from_env())
        config.train.accumulation_steps(config.parallel.data_world(world_size_from_env()))
    except ConfigError as err:
        print(f"sfd-train: {err}", file=sys.stderr)
        return 2
    from sfd_train.engine.run import run_training

    return run_training(config, task_of_config(config).task_class())


if __name__ == "__main__":
    sys.exit(main())
