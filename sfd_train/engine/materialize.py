"""Building a model that no rank holds whole: define it on the meta device, shard it, then
materialise and initialise each rank's shard (torchtitan's ``to_empty`` + ``init_weights``).

The initial weights do not depend on the world size or the strategy, and equal those of the
plain full build (the task's ``build_model`` on the CPU after ``torch.manual_seed``): the same
seed gives the same model, bit for bit, on 1 rank or 1024, with DDP, FSDP2, HSDP, TP or ZeRO.

How: while the model is defined on the meta device, :func:`define_on_meta` records every
operation that gives a parameter or buffer its value, in the order the constructor applies
them: the draws of ``nn.init`` (``uniform_``, ``normal_``), ``fill_``/``zero_``, ``copy_`` from a
table computed on the CPU, tensors created as zeros or ones. After parallelisation,
:meth:`InitPlan.replay` runs the same operations in the same order, each on a whole CPU tensor of
the global shape drawn from the global CPU generator (exactly as the full build draws it), and
keeps only this rank's part of it (:func:`local_part`). The peak is one tensor, not one model.

What it costs: the CPU generator (Mersenne Twister) is sequential, so every rank still steps it
through every random number of the full build; it only computes the values it keeps. A draw whose
values a later operation overwrites (torch's default init, replaced by the model's own) and the
part of a ``uniform_``/``normal_`` draw that other ranks hold are stepped over (:func:`advance`,
about half the cost of drawing a float), and a rank draws only its own rows of a tensor sharded by
rows (:meth:`InitOp.draw_rows`). The rest (a draw whose count depends on its values, as the
rejection sampling of ``trunc_normal_``; a split that is not a range of rows) is drawn whole and
sliced. Memory, the EMA copy and the sharding copies shrink with the ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from sfd_train.engine.strategy import clean_name, local_tensor
from sfd_train.engine.tensor_parallel import global_index

aten = torch.ops.aten

# Tensors created with their value (``nn.Parameter(torch.ones(d))``); ``empty`` leaves the value
# to a later operation.
_VALUED_FACTORIES = {aten.zeros, aten.ones, aten.full}
# In-place operations that give a tensor a new value whatever it held; any other in-place operation
# (``mul_``, ``clamp_``) reads the value it changes.
_OVERWRITES = {aten.uniform_, aten.normal_, aten.fill_, aten.zero_, aten.copy_, aten.random_, aten.exponential_,
               aten.log_normal_, aten.cauchy_, aten.geometric_}
# nn.init functions whose operations cannot be recorded one by one on a meta tensor (most return it
# untouched, eye_ writes through out=): recorded whole, one operation each. Name -> whether it draws.
_WHOLE_INIT_FUNCTIONS = {"trunc_normal_": True, "orthogonal_": True, "sparse_": True, "dirac_": False, "eye_": False}


# How far each step-over moves at most: the buffer it writes into is this many bytes.
_ADVANCE_CHUNK = 1 << 20


def advance(draws: int) -> None:
    """Steps the global CPU generator over ``draws`` 32-bit numbers without computing floats.

    ``random_`` on a uint8 tensor takes one 32-bit number per element (as a float32 ``uniform_``
    does, and ``normal_`` before its transform), the cheapest way torch offers to step the generator.
    """
    buffer = torch.empty(min(draws, _ADVANCE_CHUNK), dtype=torch.uint8)
    while draws > 0:
        step = min(draws, _ADVANCE_CHUNK)
        buffer[:step].random_()
        draws -= step


class InitRecordError(RuntimeError):
    """The model's constructor does something to a parameter that cannot be replayed per shard."""


@dataclass
class InitOp:
    """One recorded operation on the whole of ``target``.

    Attributes:
        target: the parameter's or buffer's name (wrapper segments removed); None for a draw into
            a temporary tensor, replayed only to keep the generator in step.
        func: an aten operation or an ``nn.init`` function, applied as ``func(t, *args, **kwargs)``;
            a factory (``zeros``, ``ones``, ``full``) is called as ``func(*args, **kwargs)``.
        shape, dtype: of the tensor it was applied to (a view covering the whole target, e.g.
            a conv weight seen as a matrix), or of the tensor it created.
        args, kwargs: the operation's other arguments (CPU tensors for ``copy_``).
        creates: a factory.
        overwrites: the result does not depend on the tensor's value before (``uniform_``, ``fill_``,
            ``copy_`` ...); an update (``mul_``, ``clamp_``) does.
        draws: it consumes the random generator.
        live: False when a later operation overwrites the target before anything reads it: a
            draw is then replayed only to keep the generator in step, anything else skipped.
    """

    target: str | None
    func: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    args: tuple
    kwargs: dict
    creates: bool
    overwrites: bool
    draws: bool
    live: bool = True

    def draw_count(self) -> int | None:
        """How many 32-bit numbers this operation takes from the generator, if known without running
        it: a float32 ``uniform_`` one per element; a float32 ``normal_`` of 16 or more elements one
        per element, in blocks of 16 (Box-Muller on each block's two halves), plus 16 more to redo the
        last block when the size is not a multiple of 16. None for anything else."""
        if self.creates or self.dtype != torch.float32 or self.kwargs.get("generator") is not None:
            return None
        numel = _numel(self.shape)
        if self.func is aten.uniform_.default:
            return numel
        if self.func is aten.normal_.default and numel >= 16:
            return numel + (16 if numel % 16 else 0)
        return None

    def draw_rows(self, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` (flat) of the tensor this draw gives, and the generator left
        where drawing the whole tensor leaves it. Only for operations with a :meth:`draw_count`.

        ``uniform_`` maps each number to one element. ``normal_`` pairs the numbers of each block of
        16, so the rows are widened to whole blocks; a last, partial block is drawn from the 16
        numbers after the body (torch redoes the last 16 elements with them).
        """
        numel = _numel(self.shape)
        out = torch.empty(stop - start, dtype=self.dtype)
        if self.func is aten.uniform_.default:
            advance(start)
            self.func(out, *self.args, **self.kwargs)
            advance(numel - stop)
            return out
        body = numel - numel % 16  # whole blocks; a partial last block is redrawn
        low, high = start - start % 16, min(-(-stop // 16) * 16, body)
        advance(low)
        if high > low:
            drawn = self.func(torch.empty(high - low, dtype=self.dtype), *self.args, **self.kwargs)
            first, last = start, min(stop, high)
            if last > first:
                out[first - start:last - start] = drawn[first - low:last - low]
        advance(numel - max(high, low))
        if numel % 16:
            tail = self.func(torch.empty(16, dtype=self.dtype), *self.args, **self.kwargs)
            first = max(start, numel - 16)
            if stop > first:
                out[first - start:] = tail[first - (numel - 16):stop - (numel - 16)]
        return out

    def apply(self, current: torch.Tensor | None) -> torch.Tensor:
        """The whole target after this operation, computed on the CPU as the full build computes it.

        Args:
            current: the whole target before it (needed by an update, ignored by an overwrite).
        """
        if self.creates:
            return self.func(*self.args, **{**self.kwargs, "device": torch.device("cpu")})
        out = torch.empty(self.shape, dtype=self.dtype) if self.overwrites else current.view(self.shape)
        self.func(out, *self.args, **self.kwargs)
        return out


@dataclass
class InitPlan:
    """The recorded initialisation of a model (see :func:`define_on_meta`)."""

    ops: list[InitOp] = field(default_factory=list)

    @torch.no_grad()
    def replay(self, module: nn.Module) -> None:
        """Gives ``module`` (materialised, possibly sharded) its initial values, each rank its part.

        Args:
            module: the recorded model after parallelisation and ``to_empty``; its names may carry
                wrapper segments (activation checkpointing, compile), which are ignored.
        """
        tensors = {clean_name(name): t for name, t in _named_tensors(module)}
        last = {op.target: index for index, op in enumerate(self.ops) if op.target is not None}
        live_ops: dict[str, int] = {}
        for op in self.ops:
            if op.live:
                live_ops[op.target] = live_ops.get(op.target, 0) + 1
        whole: dict[str, torch.Tensor] = {}  # targets being computed (one at a time in practice)
        for index, op in enumerate(self.ops):
            count = op.draw_count() if op.draws else None
            if not op.live:
                if count is not None:
                    advance(count)  # keeps the generator where the full build has it
                elif op.draws:
                    op.apply(None)
                continue
            target = tensors[op.target]
            rows = _flat_rows(target) if count is not None and live_ops[op.target] == 1 else None
            if rows is not None:  # a single draw gives the target its value: draw only this rank's rows
                local_tensor(target).copy_(op.draw_rows(*rows).view(local_tensor(target).shape))
                continue
            whole[op.target] = op.apply(whole.get(op.target)).reshape(target.shape)
            if last[op.target] == index:
                local_tensor(target).copy_(local_part(whole.pop(op.target), target))


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a tensor of ``like``'s global shape), laid out as ``like``'s
    local tensor: ``full`` itself unless ``like`` is a DTensor.

    Raises:
        ValueError: ``full`` does not have ``like``'s global shape.
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(full.shape)} where {tuple(like.shape)} is expected")
    if not isinstance(like, DTensor):
        return full
    part = full
    for dim, index in enumerate(global_index(like)):
        if index is None:
            continue
        if index.numel() and bool((index.diff() == 1).all()):
            part = part.narrow(dim, int(index[0]), index.numel())  # a contiguous range: no copy yet
        else:
            part = part.index_select(dim, index)
    expected = like.to_local().shape
    if part.shape != expected:
        raise AssertionError(f"local part {tuple(part.shape)} != local tensor {tuple(expected)} ({like.placements})")
    return part


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _flat_rows(like: torch.Tensor) -> tuple[int, int] | None:
    """The flat range ``[start, stop)`` of the global tensor that ``like``'s local tensor holds, when
    it is a range of whole rows (FSDP2's dim-0 shards, HSDP, a column-wise tensor-parallel split);
    None when it is not (a split along another dimension, or by parts) or ``like`` is not sharded."""
    if not isinstance(like, DTensor) or like.dim() == 0:
        return None
    index = global_index(like)
    if any(i is not None for i in index[1:]):
        return None
    row = _numel(tuple(like.shape[1:]))
    rows = index[0]
    if rows is None:
        return 0, like.shape[0] * row
    if rows.numel() == 0:
        return 0, 0
    if not bool((rows.diff() == 1).all()):
        return None
    return int(rows[0]) * row, (int(rows[-1]) + 1) * row


def _named_tensors(module: nn.Module):
    return chain(module.named_parameters(), module.named_buffers())


class _Recorder(TorchDispatchMode):
    """Notes every value-giving operation on a meta tensor, in order, as ``(func, tensor, args,
    kwargs, creates, overwrites, draws)``."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        draws = torch.Tag.nondeterministic_seeded in func.tags
        written = [i for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        if written == [0] and isinstance(args[0], torch.Tensor):  # in place
            if args[0].is_meta:
                self.events.append((func, args[0], tuple(args[1:]), dict(kwargs), False,
                                    func.overloadpacket in _OVERWRITES, draws))
            elif draws:  # it moved the generator now, and a replay would not
                raise InitRecordError(f"{func} draws random numbers into a {args[0].device} tensor while the model "
                                      "is defined; draw into the parameters themselves so that it can be replayed")
        elif written:
            if any(isinstance(a, torch.Tensor) and a.is_meta for a in chain(args, kwargs.values())):
                raise InitRecordError(f"{func} writes into an out= tensor while initialising; use an in-place "
                                      "operation on the parameter so that it can be replayed")
        elif func.overloadpacket in _VALUED_FACTORIES and isinstance(out, torch.Tensor) and out.is_meta:
            self.events.append((func, out, tuple(args), dict(kwargs), True, True, False))
        elif draws:
            raise InitRecordError(f"{func} draws random numbers into a new tensor; initialise parameters in place "
                                  "(nn.init functions) so that each rank can replay the draws")
        return out

    @contextlib.contextmanager
    def init_functions(self):
        """While active, the ``nn.init`` functions of :data:`_WHOLE_INIT_FUNCTIONS` record themselves
        when given a meta tensor (``nn.init.trunc_normal_(...)``; a reference taken before, as in
        ``from torch.nn.init import trunc_normal_``, is not seen)."""
        originals = {name: getattr(nn.init, name) for name in _WHOLE_INIT_FUNCTIONS}

        def recording(name: str, function: Callable) -> Callable:
            def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                if not tensor.is_meta:
                    return function(tensor, *args, **kwargs)
                self.events.append((function, tensor, args, kwargs, False, True, _WHOLE_INIT_FUNCTIONS[name]))
                return tensor
            return wrapper

        for name, function in originals.items():
            setattr(nn.init, name, recording(name, function))
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(nn.init, name, function)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def define_on_meta(build: Callable[[], nn.Module]) -> tuple[nn.Module, InitPlan]:
    """``build()`` on the meta device, and how its parameters and buffers got their values.

    Returns:
        The model (no memory) and its :class:`InitPlan`.

    Raises:
        InitRecordError: an operation cannot be replayed per shard (the message names it), or a
            parameter or buffer ends up with no recorded value.
    """
    recorder = _Recorder()
    with torch.device("meta"), recorder.init_functions(), recorder:
        model = build()
    owners: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, t in _named_tensors(model):
        owners.setdefault(_storage_key(t), []).append((name, t))
    ops: list[InitOp] = []
    for func, t, args, kwargs, creates, overwrites, draws in recorder.events:
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in chain(args, kwargs.values())):
            raise InitRecordError(f"{func} reads a meta tensor while initialising; compute the value on the CPU "
                                  "(device='cpu') so that it can be replayed")
        name = _covered_target(owners.get(_storage_key(t), []), t, func)
        if name is None and not draws:
            continue  # a temporary's value that no parameter keeps
        ops.append(InitOp(name, func, tuple(t.shape), t.dtype, args, kwargs, creates, overwrites, draws))
    _mark_dead(ops)
    valued = {op.target for op in ops if op.overwrites}
    missing = [name for name, _ in _named_tensors(model) if name not in valued]
    if missing:
        raise InitRecordError(f"no recorded initial value for {', '.join(missing[:5])}: set it in the constructor with "
                              "an nn.init function, fill_ or copy_ (a tensor made from data cannot be replayed)")
    for op in ops:
        if op.target is not None:
            op.target = clean_name(op.target)
    return model, InitPlan(ops)


def _covered_target(owners: list[tuple[str, torch.Tensor]], t: torch.Tensor, func) -> str | None:
    """The name of the parameter/buffer ``t`` is the whole of (itself or a full view); None if none."""
    for name, owner in owners:
        if (t.numel() == owner.numel() and t.storage_offset() == owner.storage_offset() and t.is_contiguous()
                and owner.is_contiguous()):
            return name
        raise InitRecordError(f"{func} writes part of {name} ({tuple(t.shape)} of {tuple(owner.shape)}); "
                              "initialise whole parameters so that each rank can take its part")
    return None


def _mark_dead(ops: list[InitOp]) -> None:
    """Marks the operations whose result a later overwrite of the same target replaces unread
    (all before the target's last overwrite), and the draws into temporaries."""
    last_overwrite: dict[str, int] = {}
    for index, op in enumerate(ops):
        if op.target is not None and op.overwrites:
            last_overwrite[op.target] = index
    for index, op in enumerate(ops):
        op.live = op.target is not None and index >= last_overwrite.get(op.target, index)


@torch.no_grad()
def copy_local_state(dst: nn.Module, src: nn.Module) -> None:
    """Copies ``src``'s parameters and buffers into ``dst``'s, local part to local part (both laid
    out alike: e.g. the EMA from the model it follows, shard by shard)."""
    sources = {clean_name(name): t for name, t in _named_tensors(src)}
    for name, t in _named_tensors(dst):
        local_tensor(t).copy_(local_tensor(sources[clean_name(name)]))
