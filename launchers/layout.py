"""A job's layout on the nodes it was given: mesh, per-rank micro-batch, accumulation.

A Slurm job submitted with ``launcher.slurm.min_nodes`` may start on any number of
nodes from ``min_nodes`` to ``launcher.nodes``, and a requeued job may come back on
another number. The data order and the checkpoints do not depend on the number of
ranks, so the job keeps ``train.global_batch_size`` and derives the rest at every start
from the nodes it got: for fsdp2, HSDP with one shard group per node (unless the config
chose a mesh), then the per-rank micro-batch and the accumulation steps as the trainer
computes them (``train.micro_batch_size`` stays when set, the accumulation grows as
nodes go away; unset, each rank takes global / ranks).

``python -m sfd_train.launchers.layout`` is what ``node.sh`` runs before torchrun. It
prints shell assignments for the script to ``eval``:

* ``LAYOUT_ARGS``   the trainer's mesh overrides for this node count (may be empty);
* ``LAYOUT``        one line that names the layout, for the log;
* ``LAYOUT_WAS``    the layout of the previous start when it differed (``--record``);
* ``LAYOUT_ERROR``  why this node count cannot run the job (then nothing else).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from sfd_train.config import Config, ConfigError, load_config
from sfd_train.config.schema import ParallelConfig


def default_mesh(config: Config, nodes: int, nproc_per_node: int) -> ParallelConfig:
    """FSDP2 on several nodes shards inside each node and replicates across nodes (HSDP), unless
    the config chose a mesh itself: parameter all-gathers and gradient reduce-scatters then stay
    on the node's links (NVLink, HCCS), and only one gradient all-reduce per step crosses the
    slower network. One node keeps the flat mesh. ``parallel.dp_shard`` = the world size asks
    for flat FSDP2 across nodes.

    When the global batch is smaller than the number of ranks, data parallelism runs out of
    samples: tensor parallelism inside each node (the smallest degree that leaves a data world
    dividing the batch) takes the rest, eager (tensor parallelism runs without compile).
    """
    parallel = config.parallel
    if not mesh_follows_nodes(parallel):
        return parallel
    tp = tensor_parallel_degree(config, nodes * nproc_per_node, nproc_per_node)
    if tp > 1:
        return replace(parallel, dp_replicate=nodes, dp_shard=nproc_per_node // tp, tp=tp, compile=False)
    if nodes == 1:
        return parallel
    return replace(parallel, dp_replicate=nodes, dp_shard=nproc_per_node)


def tensor_parallel_degree(config: Config, world: int, nproc_per_node: int) -> int:
    """1 while the global batch covers every rank; else the smallest degree inside a node that
    divides the heads and leaves a data-parallel world dividing the global batch (1 if none)."""
    batch = config.train.global_batch_size
    if batch >= world:
        return 1
    for tp in range(2, nproc_per_node + 1):
        if nproc_per_node % tp == 0 and config.model.dims()[2] % tp == 0 and batch % (world // tp) == 0:
            return tp
    return 1


def mesh_follows_nodes(parallel: ParallelConfig) -> bool:
    """Whether the launcher picks the mesh from the node count (fsdp2, no mesh in the config)."""
    chose = parallel.dp_replicate != 1 or parallel.dp_shard != -1 or parallel.tp != 1
    return parallel.strategy == "fsdp2" and not chose


@dataclass(frozen=True)
class Layout:
    """How a job runs on ``nodes`` nodes of ``nproc_per_node`` ranks each."""

    nodes: int
    nproc_per_node: int
    parallel: ParallelConfig
    """The parallel section with the mesh for this node count."""
    configured: ParallelConfig
    """The parallel section as the config has it."""
    global_batch: int
    micro_batch: int
    accumulation: int
    data_world: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    def trainer_overrides(self) -> list[str]:
        """What the trainer's command line adds to the frozen config for this node count."""
        parallel = self.parallel
        if parallel == self.configured:
            return []
        overrides = [f"parallel.dp_replicate={parallel.dp_replicate}", f"parallel.dp_shard={parallel.dp_shard}"]
        if parallel.tp != self.configured.tp:
            overrides += [f"parallel.tp={parallel.tp}", f"parallel.compile={str(parallel.compile).lower()}"]
        return overrides

    def describe(self) -> str:
        replicate, shard, tp = self.parallel.mesh_shape(self.world_size)
        mesh = [f"{replicate} replica(s) x {shard} shard(s)" if replicate > 1 else f"{shard} shard(s)"]
        if tp > 1:
            mesh.append(f"tensor parallel {tp}")
        return (
            f"{self.nodes} node(s) x {self.nproc_per_node} rank(s): {self.parallel.strategy} "
            f"({', '.join(mesh)}), global batch {self.global_batch} = {self.micro_batch} per rank x "
            f"{self.data_world} data-parallel rank(s) x {self.accumulation} accumulation step(s)"
        )


def plan(config: Config, nodes: int, nproc_per_node: int) -> Layout:
    """The layout of ``config`` on ``nodes`` nodes.

    Raises:
        ConfigError: the nodes cannot keep the config's global batch or mesh; the message
            names the node count, the ranks and the numbers that do not divide.
    """
    parallel = default_mesh(config, nodes, nproc_per_node)
    world = nodes * nproc_per_node
    try:
        parallel.mesh_shape(world)
        data_world = parallel.data_world(world)
        accumulation = config.train.accumulation_steps(data_world)
    except ConfigError as err:
        raise ConfigError(err.key, f"{nodes} node(s) x {nproc_per_node} rank(s) = {world} ranks: {reason(err)}") from None
    return Layout(
        nodes=nodes, nproc_per_node=nproc_per_node, parallel=parallel, configured=config.parallel, global_batch=config.train.global_batch_size,
        micro_batch=config.train.per_rank_batch(data_world), accumulation=accumulation, data_world=data_world,
    )


def reason(err: ConfigError) -> str:
    """The message of ``err`` without its "config key '...': " head."""
    head = f"config key '{err.key}': "
    text = str(err)
    return text[len(head):] if text.startswith(head) else text


def _assignments(values: dict[str, str]) -> str:
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in values.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfd_train.launchers.layout",
        description="The layout of a launched job on the nodes it was given, as shell assignments for node.sh "
        "(LAYOUT_ARGS, LAYOUT, LAYOUT_WAS, or LAYOUT_ERROR).",
    )
    parser.add_argument("config", help="the job's frozen config (<run.output_dir>/launch/config.yaml)")
    parser.add_argument("--nodes", type=int, required=True, help="nodes the job was given")
    parser.add_argument("--nproc-per-node", type=int, required=True, help="ranks per node")
    parser.add_argument("--record", type=Path, metavar="FILE",
                        help="compare with the layout FILE holds (the previous start), then store this one there")
    args = parser.parse_args(argv)
    try:
        layout = plan(load_config(args.config), args.nodes, args.nproc_per_node)
    except ConfigError as err:
        print(_assignments({"LAYOUT_ERROR": f"the job cannot run on the nodes it was given: {err}"}), end="")
        return 0
    line = layout.describe()
    values = {"LAYOUT_ARGS": " ".join(layout.trainer_overrides()), "LAYOUT": line, "LAYOUT_WAS": ""}
    if args.record is not None:
        before = args.record.read_text().strip() if args.record.is_file() else ""
        if before and before != line:
            values["LAYOUT_WAS"] = before
        args.record.write_text(line + "\n")
    print(_assignments(values), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
