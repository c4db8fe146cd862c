"""What torch.compile is applied to, and how (the ``parallel.compile*`` keys).

Two scopes:

- ``blocks``: every block becomes its own graph, as in torchtitan. Blocks map the stream to
  the stream, so one compiled graph serves all blocks of a size, and it composes with every
  sharding strategy.
- ``step``: the function that turns a micro-batch into its loss (noising, the whole
  network, the loss terms and their weighted sum) is compiled as one. Inductor then fuses
  across block boundaries (one block's residual add with the next block's norm) and the
  objective's elementwise work stops running as separate eager kernels. Wrappers that run
  their own hooks (DDP's forward, FSDP2's per-block hooks) split the graph where they sit.

Model and objective code know nothing of this: a task hands its loss function to
:func:`compile_step` (the SFD task's lives next to that task; the step benchmark uses it too).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sfd_train.config.schema import CUDA_GRAPH_MODES, ParallelConfig


def compile_kwargs(parallel: ParallelConfig) -> dict:
    """``torch.compile`` keyword arguments for the configured backend and mode."""
    mode = None if parallel.compile_mode == "default" else parallel.compile_mode
    return {"backend": parallel.compile_backend, "mode": mode}


def compile_blocks(model: nn.Module, parallel: ParallelConfig) -> None:
    """Compiles each block in place (``Module.compile`` keeps parameter names unchanged)."""
    for block in model.blocks:
        block.compile(fullgraph=False, **compile_kwargs(parallel))


def compile_step(fn: Callable, parallel: ParallelConfig) -> Callable:
    """``fn`` (a task's micro-batch loss) compiled as one graph with ``parallel.compile_scope: step``,
    else ``fn`` itself. The task draws its random inputs outside ``fn``, so a compiled step replays
    exactly what the eager one computes."""
    if parallel.compile and parallel.compile_scope == "step":
        return torch.compile(fn, fullgraph=False, **compile_kwargs(parallel))
    return fn


def begin_micro_batch(parallel: ParallelConfig) -> None:
    """Tells CUDA-graph trees that a new forward begins, so the previous replay's outputs may be reused."""
    if parallel.compile and parallel.compile_mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
