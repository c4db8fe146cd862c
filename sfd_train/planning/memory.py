"""Memory per device of one training step, traced without memory.

The step is the trainer's own: the task builds the real model, ``parallelize_torch`` applies
activation checkpointing, compile and DDP or FSDP2 on a process group of the job's world size,
and :meth:`~sfd_train.engine.trainer.Trainer.train_step` runs forward, backward, optimizer and
EMA over the job's micro-batches. For a plan the tensors are ``FakeTensor``s (shapes and dtypes,
no storage) and the process group is PyTorch's fake backend (collectives return at once), so a
step of a 1-billion-parameter model on 1,024 ranks runs on a laptop CPU; for validation the same
code runs with real tensors on a real gloo group. PyTorch's ``FSDPMemTracker`` (FSDP2) or
``MemTracker`` (DDP) sees every tensor the step allocates and frees and reports the peak, split
into parameters, gradients, optimizer state, activations and FSDP's communication buffers
(torchtitan's memory estimator is built the same way).

What the CPU trace does differently from the device, and how it is accounted for
(:func:`device_config`, :class:`StepTracer`):

- **Attention.** On CUDA the trainer takes SDPA's flash/cuDNN/efficient kernels, on Ascend the
  fused NPU attention: none keeps the N x N score matrix, only the output and a row statistic.
  The trace runs SDPA's flash-style CPU kernel, which saves the same. Where the device would take
  the math path (``kernels.attention: reference`` or ``sdpa_backends: [math]``) the trace takes
  the reference, whose fp32 scores and softmax are saved.
- **Fused kernels.** The Triton/apex/NPU norm and RoPE kernels cannot run on the CPU. Inside
  ``torch.compile`` (the presets compile) the device traces the reference expressions too
  (``kernels.inside_compile: inductor``), so the trace uses them. Eager CUDA runs without compile
  save less per norm than the reference does: there the plan is an upper bound.
- **Compile.** Inductor cannot run on fake tensors, and compiling the whole traced model costs
  minutes on two CPU cores. What a compiled block keeps for backward is decided before code
  generation, by AOTAutograd's min-cut partitioner on the graph with Inductor's decompositions:
  :func:`compile_savings` runs one block eagerly and once compiled with
  ``aot_eager_decomp_partition`` (that partition; the graphs then run op by op, no code is
  generated), both under the tracker, and the difference in what each keeps after its forward --
  per block, per micro-batch -- comes off the eager step's activations.
- **Optimizer.** CUDA and Ascend run fused AdamW (no temporaries); the CPU trace does too.
- **Optimizer state.** The first step creates it; the tracer creates it first with a step on zero
  gradients (the same code path, without a forward), then traces a whole step.
- **DDP's gradient buckets** are allocated when DDP is built, before the tracker starts; they hold
  every trainable parameter's gradient once more (``gradient_as_bucket_view`` is off), which is
  added to ``buffers`` in closed form. The **EMA** is a module of its own, outside the tracked
  one; its bytes are its (sharded) tensors' storage.
- **Accumulation.** Micro-batches after the second repeat the second's memory (FSDP2 and DDP keep
  the accumulated gradients from the first on), so at most two are traced: the first without
  gradient sync, the last with it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch
import torch.distributed as dist

from sfd_train.config import Config
from sfd_train.engine.distributed import World
from sfd_train.engine.strategy import local_tensor

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """Bytes per device at the step's peak, by category.

    Attributes:
        parameters: the parameters this rank holds (its FSDP shards, or the whole model under DDP) and
            the model's buffers (RoPE tables).
        gradients: gradients alive at the peak (sharded, and unsharded ones FSDP2 still holds).
        optimizer: AdamW's moments (and step counters).
        ema: the EMA copy of the parameters (sharded like them).
        activations: what the forward keeps for backward, the backward's temporaries, the batch.
        buffers: communication and staging: FSDP2's gathered parameters and all-gather outputs of the
            units in flight, its reduce-scatter inputs; DDP's gradient buckets.
    """

    parameters: float = 0
    gradients: float = 0
    optimizer: float = 0
    ema: float = 0
    activations: float = 0
    buffers: float = 0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def gib(self) -> dict[str, float]:
        """Every category and the total in GiB (the ``memory_gib`` of ``sfd-launch plan --json``)."""
        out = {f.name: getattr(self, f.name) / GiB for f in fields(self)}
        out["total"] = self.total / GiB
        return out

    def combine(self, other: "StepMemory", weight: float) -> "StepMemory":
        """``self + weight * (other - self)`` per category (linear inter- and extrapolation)."""
        return StepMemory(**{f.name: getattr(self, f.name) + weight * (getattr(other, f.name) - getattr(self, f.name))
                             for f in fields(self)})


# The trackers' categories (their enum values) -> ours.
CATEGORY_OF = {
    "Sharded Param": "parameters", "Parameter": "parameters", "Buffer": "parameters",
    "Sharded Grad": "gradients", "Unsharded Grad": "gradients", "Gradient": "gradients",
    "OptState": "optimizer", "Optstate": "optimizer",
    "Activation": "activations", "Temp": "activations", "Inputs": "activations",
    "Unsharded Param": "buffers", "All Gather": "buffers", "Reduce Scatter": "buffers", "Other": "buffers",
}


def device_keeps_scores(config: Config) -> bool:
    """Whether the device's attention keeps the N x N score matrix (the math path)."""
    kernels = config.kernels
    return kernels.attention == "reference" or (kernels.attention in ("auto", "sdpa")
                                                and list(kernels.sdpa_backends) == ["math"])


def device_config(config: Config) -> Config:
    """``config`` as the CPU trace runs it: kernels with the device's saved tensors, compile with
    Inductor's partition but no code generation (see the module docstring)."""
    scores = device_keeps_scores(config)
    # SDPA's flash kernel for the CPU keeps what the device's flash/cuDNN kernels keep; left to choose,
    # SDPA takes its math path for some shapes on the CPU (small batches), which keeps the scores.
    kernels = replace(config.kernels, attention="reference" if scores else "sdpa", rms_norm="reference",
                      rope="reference", qk_norm_rope="separate", swiglu="reference", add_rms_norm="separate",
                      sdpa_backends=[] if scores else ["flash"])
    # The step is traced eagerly; what torch.compile changes is measured on one block
    # (compile_savings) and taken off the activations.
    parallel = replace(config.parallel, compile=False)
    # Weights to start from change no byte the step holds; the plan reads no checkpoint.
    checkpoint = replace(config.checkpoint, init_from=None)
    return replace(config, kernels=kernels, parallel=parallel, checkpoint=checkpoint)


@dataclass(frozen=True)
class DataShapes:
    """What a task reads from its loader when it is built, from the config instead of the data."""

    channels: tuple[int, int]
    feature_dim: int | None


def data_shapes(config: Config) -> DataShapes:
    model = config.model
    features = model.repa_feature_dim if (model.use_repa and config.data.use_repa_features) else None
    return DataShapes((model.texture_channels, model.semantic_channels), features)


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks, this process rank 0 (PyTorch's testing backend:
    every collective returns at once and moves nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised; the plan needs its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _parallelize_on_fake_tensors(strategy: str) -> Iterator[None]:
    """What ``parallelize_torch`` needs to run under a ``FakeTensorMode``, patched in for the call.

    Four steps cannot run on fake tensors and do not need to: the device meshes read their rank maps
    back (``tolist``), so they are built of real tensors; the initial values are replayed shard by
    shard with index arithmetic on values, which fake tensors do not have (a plan needs no values);
    ``Module.to_empty`` swaps each parameter object for the new one, which PyTorch refuses for a
    fake tensor (its fake mode holds a weak reference to it) -- FSDP2's DTensor parameters are
    exempt, DDP's plain ones get new ``Parameter`` objects instead; and DDP's constructor checks the
    parameters' data across ranks, so DDP is replaced by :class:`_DDPOnFakeTensors`, which
    forwards the model and synchronises nothing: on the device DDP adds its gradient buckets,
    counted in closed form (``StepTracer.bucket_bytes``). These belong in the engine as hooks
    (``device_meshes`` building the meshes under ``unset_fake_temporarily``, ``initialise`` and the
    materialisation knowing a fake mode); until then they are patched here, for the call only.
    """
    from torch import nn
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from sfd_train.engine import parallelize

    build_meshes, initialise, to_empty = parallelize.device_meshes, parallelize.initialise, nn.Module.to_empty
    shard = parallelize.apply_fsdp2

    def real_meshes(*args, **kwargs):
        with unset_fake_temporarily():
            return build_meshes(*args, **kwargs)

    def shard_with_real_meshes(*args, **kwargs):
        # fully_shard reads the (tensor-parallel) mesh's rank map too; the parameters stay fake
        # without the ambient mode (a fake tensor dispatches to its own mode).
        with unset_fake_temporarily():
            return shard(*args, **kwargs)

    def new_parameters(module: nn.Module, *, device, recurse: bool = True) -> nn.Module:
        for sub in module.modules() if recurse else (module,):
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = torch.empty_like(buffer, device=device)
        return module

    ddp = parallelize.DistributedDataParallel
    parallelize.device_meshes, parallelize.apply_fsdp2 = real_meshes, shard_with_real_meshes
    parallelize.initialise = lambda *args, **kwargs: None
    if strategy == "ddp":
        nn.Module.to_empty = new_parameters
        parallelize.DistributedDataParallel = _DDPOnFakeTensors
    try:
        yield
    finally:
        parallelize.device_meshes, parallelize.initialise, nn.Module.to_empty = build_meshes, initialise, to_empty
        parallelize.apply_fsdp2 = shard
        parallelize.DistributedDataParallel = ddp


class _DDPOnFakeTensors(torch.nn.Module):
    """DDP's interface for a traced step: the forward of the model it wraps, ``no_sync``, no
    gradient synchronisation (whose only memory, the buckets, the tracer counts in closed form)."""

    def __init__(self, module: torch.nn.Module, **_):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()


def _tracker_classes():
    """The trackers, told to stay out of torch.compile's tracing (they count what compiled code runs)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class FSDPTracker(FSDPMemTracker):
        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

    class Tracker(MemTracker):
        @classmethod
        def ignore_compile_internals(cls) -> bool:
            return True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # A view or an op writing into its arguments (in place, out=, an in-place collective)
            # allocates nothing: its output is
            # memory that exists already. DDP's gradient buckets, allocated before the tracker starts
            # and counted in closed form, reach it only that way (the reducer's bucket views, the
            # copies into them, the all-reduce); tracked here they would count twice.
            if func.is_view or _writes_into_input(func):
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # MemTracker hooks every parameter's gradient; a frozen one (pos_embed) gets no gradient
            # and refuses the hook, so it is marked as hooked already.
            for param in module.parameters():
                if not param.requires_grad and param not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FSDPTracker, Tracker


def _writes_into_input(func) -> bool:
    """Whether the op writes into a tensor it is given: in place, ``out=``, or an in-place collective
    (whose schemas, ``c10d::allreduce_(Tensor[] tensors, ...)``, do not mark the write)."""
    if func.namespace == "c10d" and func._schema.name.endswith("_"):
        return True
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


class _NoHook:
    def remove(self) -> None:
        """Nothing was registered."""


def _restart_peak(tracker, modules: bool = True) -> None:
    """Makes the tracker's peak start from what is held now (the trackers have no public call for
    it; torchtitan's estimator resets the module statistics between iterations, as this does too)."""
    if modules:
        tracker.reset_mod_stats()
    tracker._peak_mem_snap = tracker.get_tracker_snapshot("current")
    tracker._peak_mem = {device: snapshot["Total"] for device, snapshot in tracker._peak_mem_snap.items()}


class _NoCheckpoints:
    def wait_for_staging(self) -> None:
        """No checkpoint is in flight during a traced step."""


class _StepHarness:
    """The attributes :meth:`Trainer.train_step` reads, so that the trainer's own loop runs."""

    def __init__(self, config: Config, task, strategy, device: torch.device, micro_batch: int, accumulation: int):
        self.config, self.task, self.strategy, self.device = config, task, strategy, device
        self.micro_batch, self.accumulation = micro_batch, accumulation
        self.data_rank, self.step = 0, 0
        self.checkpoints = _NoCheckpoints()
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=config.train.mixed_precision == "bf16")


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        key = id(storage) if isinstance(local_tensor(t), torch._subclasses.FakeTensor) else storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += int(storage.nbytes())
    return total


class StepTracer:
    """One model built and parallelized as the trainer does it; :meth:`measure` traces a step.

    Args:
        config: the job's config as the ranks run it (the launcher's mesh applied).
        world_size: ranks of the job (a process group of that size must be initialised: real, or
            :func:`fake_world`).
        accumulation: micro-batches per optimizer step (at most two are traced, see the module docstring).
        target: the device type the job runs on (``cuda``, ``npu``; ``cpu`` for a run on CPUs).
        fake_mode: a ``FakeTensorMode`` to build and trace in; None traces real tensors.
        device: where the tensors live: the CPU for a trace (fake or real); the accelerator itself
            for :meth:`measure_device`, which then runs the job's own kernels and compile.
    """

    def __init__(self, config: Config, world_size: int, accumulation: int, target: str, fake_mode=None,
                 device: torch.device | None = None):
        from functools import partial

        from torch._subclasses.fake_tensor import FakeCopyMode

        from sfd_train.config.registry import task_of_config
        from sfd_train.engine.optim import build_adamw, build_scheduler
        from sfd_train.engine.parallelize import parallelize_torch

        if config.parallel.strategy not in ("ddp", "fsdp2"):
            raise ValueError(f"the tracer runs ddp and fsdp2, not {config.parallel.strategy}")
        device = device or torch.device("cpu")
        on_device = device.type != "cpu"
        self.config = config if on_device else device_config(config)
        self.accumulation = min(accumulation, 2)
        self.fake_mode = fake_mode
        self.world = World(dist.get_rank(), world_size, device.index or 0, device)
        task_type = task_of_config(self.config).task_class()
        self.task = task_type(self.config, data_shapes(self.config))
        in_mode = fake_mode if fake_mode is not None else contextlib.nullcontext()
        # FakeCopyMode: the EMA's deep copy stays in this fake mode (a plain deep copy of a fake
        # tensor makes a fake mode of its own).
        fake = fake_mode is not None
        copying = FakeCopyMode(fake_mode) if fake else contextlib.nullcontext()
        hooks = _parallelize_on_fake_tensors(self.config.parallel.strategy) if fake else contextlib.nullcontext()
        with in_mode, copying, hooks:
            torch.manual_seed(self.config.train.seed)
            build = partial(task_type.build_model, self.config, device.type)
            self.strategy = parallelize_torch(build, self.world, self.config, self.task.find_unused_parameters)
            strategy = self.strategy
            if target in ("cuda", "npu") and not on_device and self.config.optimizer.fused != "off":
                # The device runs fused AdamW; torch's fused kernel exists for the CPU too.
                strategy.optimizer = build_adamw(strategy.model.parameters(), self.config.optimizer,
                                                 torch.device("cuda"))
                strategy.scheduler = build_scheduler(strategy.optimizer, self.config.optimizer,
                                                     self.config.train.max_steps)
            self._create_optimizer_state()
        self.ema_bytes = _storage_bytes([*strategy.ema.parameters(), *strategy.ema.buffers()])
        self.bucket_bytes = 0
        if self.config.parallel.strategy == "ddp":
            self.bucket_bytes = sum(p.numel() * p.element_size() for p in strategy.model.parameters() if p.requires_grad)

    def _create_optimizer_state(self) -> None:
        """The end of a step on zero gradients: AdamW creates its state, and every DTensor op of the
        step's end (gradient norm, AdamW, EMA) is propagated once, untracked."""
        strategy = self.strategy
        for p in strategy.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        strategy.step()
        strategy.update_ema(self.config.train.ema_decay)

    def _batches(self, micro_batch: int) -> Iterator[dict[str, torch.Tensor]]:
        model = self.config.model
        shape = (micro_batch, model.in_channels, model.input_size, model.input_size)
        while True:
            batch = {"x": torch.randn(shape), "y": torch.randint(0, model.num_classes, (micro_batch,)),
                     "index": torch.arange(micro_batch)}
            if self.task.uses_repa:
                grid = model.input_size // model.patch_size
                batch["dino"] = torch.randn(micro_batch, model.repa_feature_dim, grid, grid)
            yield batch

    def measure(self, micro_batches: tuple[int, ...]) -> list[dict[str, StepMemory]]:
        """Traces one optimizer step at each micro-batch (images per rank).

        Returns:
            For each micro-batch, the peak of each phase of the step (:data:`WINDOWS`), by category.
            An untracked first step runs before them (see the module docstring).
        """
        from sfd_train.engine.trainer import Trainer

        fsdp_tracker, plain_tracker = _tracker_classes()
        in_mode = self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()
        out = []
        with in_mode:
            if self.config.parallel.strategy == "fsdp2":
                tracker = fsdp_tracker(self.strategy.model, self.strategy.optimizer)
            else:
                tracker = plain_tracker()
                tracker.track_external(self.strategy.model, self.strategy.optimizer)
            blocks = self.strategy.model.blocks
            hook = blocks[0].register_forward_pre_hook(self._note_block_inputs)
            with warnings.catch_warnings():
                # As in the trainer (engine/run.py): nothing modifies the model's view output in place.
                warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
                # Untracked warm-up: FSDP2's lazy initialisation, and a real DDP's rebuilt gradient
                # buckets (allocated in its second step's forward, like the first ones counted in
                # closed form, not by the tracker).
                warmups = 2 if self.config.parallel.strategy == "ddp" and self.fake_mode is None else 1
                for _ in range(warmups):
                    Trainer.train_step(self._harness(micro_batches[0]), self._batches(micro_batches[0]))
                with tracker:
                    for micro_batch in micro_batches:
                        windows = _Windows(self.strategy, tracker, blocks)
                        harness = self._harness(micro_batch)
                        harness.strategy = windows
                        _restart_peak(tracker)
                        Trainer.train_step(harness, self._batches(micro_batch))
                        out.append({name: self._categories(snapshot) for name, snapshot in windows.peaks.items()})
            hook.remove()
        self.task.config = self.config
        return out

    def measure_device(self, micro_batch: int, steps: int = 3) -> int:
        """Bytes the device's allocator held at most during a steady-state step (the last of
        ``steps``): ``max_memory_allocated``, the figure a plan's total is compared with."""
        from sfd_train.engine.trainer import Trainer

        accelerator = getattr(torch, self.world.device.type)
        for step in range(steps):
            if step == steps - 1:
                accelerator.synchronize()
                accelerator.reset_peak_memory_stats()
            Trainer.train_step(self._harness(micro_batch), self._batches(micro_batch))
        accelerator.synchronize()
        return accelerator.max_memory_allocated()

    def _note_block_inputs(self, module, args) -> None:
        """What the first block receives: dtypes and shapes, for :func:`compile_savings`."""
        self.block_inputs = [(tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor)
                             else [(tuple(t.shape), t.dtype, t.requires_grad) for t in a] if a is not None else None
                             for a in args]

    def _harness(self, micro_batch: int) -> "_StepHarness":
        config = self.config
        # The step draws noise for the whole global batch; a micro-batch larger than the job's
        # (while searching the largest that fits) needs that many rows.
        rows = micro_batch * self.accumulation
        if rows > config.train.global_batch_size:
            config = replace(config, train=replace(config.train, global_batch_size=rows, micro_batch_size=None))
        self.task.config = config
        return _StepHarness(config, self.task, self.strategy, self.world.device, micro_batch, self.accumulation)

    def _categories(self, snapshot: dict) -> StepMemory:
        """A tracker snapshot (device -> kind -> bytes) as :class:`StepMemory`, with the EMA and DDP's buckets."""
        sums = dict.fromkeys(("parameters", "gradients", "optimizer", "activations", "buffers"), 0)
        for per_device in snapshot.values():
            for kind, value in per_device.items():
                if kind == "Total":
                    continue
                name = getattr(kind, "value", str(kind))
                if name not in CATEGORY_OF:
                    raise KeyError(f"the memory tracker reports a category {name!r} this planner does not know")
                sums[CATEGORY_OF[name]] += value
        sums["buffers"] += self.bucket_bytes
        return StepMemory(ema=self.ema_bytes, **sums)


WINDOWS = ("forward", "backward_first_block", "backward_last_block", "after_backward", "optimizer")
"""The phases of a step whose peaks are kept apart. Each holds the same kind of moment at every
depth (the end of the forward; the backward of the last block, then of the first; the gradients
complete; AdamW and the EMA), so each is linear in the depth, while the step's overall peak moves
from one phase to another as blocks are added."""


class _Windows:
    """The strategy as the training step sees it, noting the tracker's peak of each phase of the step."""

    def __init__(self, strategy, tracker, blocks):
        self._strategy, self._tracker, self._blocks = strategy, tracker, blocks
        self.peaks: dict[str, dict] = {}

    def __getattr__(self, name):
        return getattr(self._strategy, name)

    def _keep(self, name: str, snapshot: dict) -> None:
        def total(snap):
            return sum(per_device.get("Total", 0) for per_device in snap.values())

        if name not in self.peaks or total(snapshot) > total(self.peaks[name]):
            self.peaks[name] = snapshot

    def _module_peak(self, module) -> dict:
        stats = self._tracker.memory_tracking.get(module)
        snapshots = [snap for state, snaps in (stats.snapshots.items() if stats else ())
                     if getattr(state, "value", state) in ("Peak Backward", "Peak-Backward") for snap in snaps]
        return max(snapshots, key=lambda snap: sum(d.get("Total", 0) for d in snap.values()), default={})

    def backward(self, loss, accumulation_steps, last_micro_batch):
        self._keep("forward", self._tracker.get_tracker_snapshot("peak"))
        _restart_peak(self._tracker, modules=False)
        self._strategy.backward(loss, accumulation_steps, last_micro_batch)
        self._keep("backward_first_block", self._module_peak(self._blocks[-1]))
        self._keep("backward_last_block", self._module_peak(self._blocks[0]))
        self._keep("after_backward", self._tracker.get_tracker_snapshot("current"))
        _restart_peak(self._tracker)  # module statistics too: the next micro-batch's forward is a new one

    def step(self):
        _restart_peak(self._tracker, modules=False)
        return self._strategy.step()

    def update_ema(self, decay: float) -> None:
        self._strategy.update_ema(decay)
        self._keep("optimizer", self._tracker.get_tracker_snapshot("peak"))


def compile_savings(config: Config, block_inputs: list, micro_batch: int, fake_mode=None) -> float:
    """Bytes one block keeps for backward eagerly minus compiled, per image.

    The block is the task's first block, prepared by the engine (``prepare_blocks``: activation
    checkpointing, then compile) once without and once with ``torch.compile``, in the dtypes the
    traced step gave it (FSDP2's ``param_dtype``; fp32 parameters under autocast otherwise). What
    each keeps is what the tracker holds after its forward, the block's inputs excepted.

    Args:
        config: the job's config (``parallel.compile`` on; its backend is replaced by
            ``aot_eager_decomp_partition``, Inductor's partition without code generation).
        block_inputs: the first block's inputs in the traced step (``StepTracer.block_inputs``).
        micro_batch: images to measure with (every tensor a block keeps holds one row per image, so
            the difference is divided by it).
    """
    from torch._subclasses.fake_tensor import FakeCopyMode

    from sfd_train.config.registry import task_of_config
    from sfd_train.engine.parallelize import DTYPES, prepare_blocks

    eager = device_config(config)
    parallel = replace(config.parallel, compile_backend="aot_eager_decomp_partition", compile_mode="default")
    compiled = replace(eager, parallel=replace(parallel, compile=True))
    task_type = task_of_config(eager).task_class()
    dtype = DTYPES[config.parallel.param_dtype] if config.parallel.strategy == "fsdp2" else torch.float32
    in_mode = fake_mode if fake_mode is not None else contextlib.nullcontext()
    copying = FakeCopyMode(fake_mode) if fake_mode is not None else contextlib.nullcontext()
    _, plain_tracker = _tracker_classes()
    kept: dict[str, float] = {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.train.mixed_precision == "bf16")
    one_block = replace(eager.model, size="custom", depth=1, hidden_size=eager.model.dims()[1],
                        num_heads=eager.model.dims()[2], use_repa=False)
    with in_mode, copying:
        for name, variant in (("eager", eager), ("compiled", compiled)):
            variant = replace(variant, model=one_block)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)  # FSDP2 computes with parameters in param_dtype
            try:
                model = task_type.build_model(variant, "cpu")
            finally:
                torch.set_default_dtype(previous)
            prepare_blocks(model, variant)
            block = model.blocks[0]
            args = [_like(spec, micro_batch) for spec in block_inputs]
            tracker = plain_tracker()
            tracker.track_external(block)
            with tracker:
                with autocast:
                    output = block(*args)
                after = tracker.get_tracker_snapshot("current")
            held = sum(v for snap in after.values() for k, v in snap.items()
                       if getattr(k, "value", k) in ("Activation", "Temp"))
            kept[name] = held - output.numel() * output.element_size()
            del output, args
    torch._dynamo.reset()
    return (kept["eager"] - kept["compiled"]) / micro_batch


def _like(spec, micro_batch: int):
    """A fresh input as the traced block got it: per-sample tensors with ``micro_batch`` rows, the
    RoPE tables (a pair, not per sample) as they were."""
    if spec is None:
        return None
    if isinstance(spec, list):
        return tuple(torch.randn(shape, dtype=dtype) for shape, dtype, _ in spec)
    shape, dtype, requires_grad = spec
    return torch.randn((micro_batch, *shape[1:]), dtype=dtype, requires_grad=requires_grad)
