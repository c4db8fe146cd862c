"""The training loop: wires data, model, parallelism, checkpoints and logging together.

Each concern lives in its own module; this one only decides the order of things.
"""

from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sfd_train.config import Config, ConfigError, to_dict
from sfd_train.config.loader import save_config
from sfd_train.data_pipeline.errors import ManifestError
from sfd_train import device as devices
from sfd_train.engine.checkpoint import CheckpointError, CheckpointManager, step_dir_name
from sfd_train.engine.compile import begin_micro_batch
from sfd_train.engine.distributed import World, all_reduce_mean
from sfd_train.engine.liveness import Heartbeat
from sfd_train.engine.metrics import MetricsLogger, Throughput, format_progress, read_metrics
from sfd_train.engine.parallelize import parallelize_torch
from sfd_train.engine.preemption import (
    REQUEUE_EXIT_CODE,
    PreemptionWatcher,
    clear_requeue_marker,
    write_requeue_marker,
)
from sfd_train.engine.run_lock import lock_run_folder
from sfd_train.engine.task import TrainingTask
from sfd_train.engine.visualize import save_loss_plot

logger = logging.getLogger("sfd_train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or spiked; the message says when and what to try."""


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # One generator per optimizer step, seeded from (seed, step) alone: a resumed run
    # draws exactly what an uninterrupted one would, with no RNG state to carry over.
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))
    return generator


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(saved: dict[str, Any], config: Config, path: Path) -> None:
    """Refuses a checkpoint this run cannot continue (names the keys and both values).

    A resume may change anything but the model and the seed (the data order and the
    noise depend on it): optimizer, schedule and ``train.max_steps`` changes are
    applied from the next step on, and the data position carries over to another
    number of ranks or batch split.
    """
    saved_config = saved.get("config") or {}
    saved_model = saved_config.get("model", {})
    current = to_dict(config.model)
    differing = [(f"model.{k}", saved_model.get(k), current[k]) for k in sorted(current) if saved_model.get(k) != current[k]]
    saved_seed = (saved_config.get("train") or {}).get("seed", config.train.seed)
    if saved_seed != config.train.seed:
        differing.append(("train.seed", saved_seed, config.train.seed))
    if differing:
        details = ", ".join(f"{key}: {before!r} in the checkpoint, {now!r} now" for key, before, now in differing)
        raise CheckpointError(f"{path}: incompatible config ({details}); resume with the checkpoint's values, or start "
                              "a new run in another run.output_dir")


def changed_settings(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of ``current`` that differs from ``saved``."""
    changes = []
    for key, value in current.items():
        dotted = f"{prefix}{key}"
        before = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, dict) and isinstance(before, dict) and value:
            changes.extend(changed_settings(before, value, f"{dotted}."))
        elif before != value:
            changes.append(f"{dotted}: {before!r} -> {value!r}")
    return changes


class Trainer:
    """Builds everything from the config, then :meth:`fit` trains.

    Args:
        config: the validated job config.
        world: this rank's place in the process group (see ``init_distributed``).
        task: what is trained (a :class:`~sfd_train.engine.task.TrainingTask`, from the registry).
        heartbeat: told the current step, so that a stuck job can say where each rank was.
    """

    def __init__(self, config: Config, world: World, task: type[TrainingTask], heartbeat: Heartbeat | None = None):
        from sfd_train.data_pipeline.reader import build_loader

        self.config, self.world, self.heartbeat = config, world, heartbeat
        self.device = world.device
        self.run_dir = Path(config.run.output_dir)
        self.run_lock = lock_run_folder(self.run_dir, world.is_main, world.control_group)
        train = config.train
        # The ranks of a tensor-parallel group work on the same samples.
        self.data_world = config.parallel.data_world(world.world_size)
        self.data_rank = config.parallel.data_rank(world.rank, world.world_size)
        self.accumulation = train.accumulation_steps(self.data_world)
        self.micro_batch = train.per_rank_batch(self.data_world)
        torch.manual_seed(train.seed + world.rank)  # per-rank seed for anything not drawn per step
        random.seed(train.seed + world.rank)
        np.random.seed(train.seed + world.rank)

        try:
            self.loader = build_loader(
                config.data, global_batch_size=train.global_batch_size, micro_batch_size=self.micro_batch,
                rank=self.data_rank, world_size=self.data_world, seed=train.seed,
                pin_memory=self.device.type != "cpu", **task.loader_options(config),
            )
        except ManifestError as err:
            raise ConfigError("data.path", str(err)) from None
        self.task = task(config, self.loader)
        self.task.check_data()

        torch.manual_seed(train.seed)  # the same initial weights on every rank and world size
        build = partial(task.build_model, config, self.device.type)  # defined on the meta device
        if config.parallel.strategy in ("ddp", "fsdp2"):
            self.strategy = parallelize_torch(build, world, config, self.task.find_unused_parameters)
        else:
            from sfd_train.engine.zero import ZeroStrategy

            self.strategy = ZeroStrategy(build, world, config)
        self.checkpoints = CheckpointManager(self.run_dir, config.checkpoint, world, self.strategy)
        self.step = 0
        self._resume()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=train.mixed_precision == "bf16")
        self.watcher = PreemptionWatcher(self._time_limit_s(), group=world.control_group)
        self.metrics = MetricsLogger(
            self.run_dir, world.is_main, config.run.wandb_mode, config.run.wandb_project, config.run.name,
            to_dict(config),
        )
        self.throughput = Throughput(self.task.flops_per_image(), devices.peak_flops(self.device), world.world_size)

    # ------------------------------------------------------------------ set-up
    def _time_limit_s(self) -> float:
        from sfd_train.config.schema import parse_duration

        return parse_duration(self.config.run.time_limit) if self.config.run.time_limit else 0.0

    def _resume(self) -> None:
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            clear_requeue_marker(self.run_dir)
        if self.config.checkpoint.resume == "never":
            self._refuse_an_occupied_folder()
        else:
            start = self.loader.state_dict()
            restored = self.checkpoints.restore(accept=self._accept_checkpoint)
            if restored is not None:
                self._continue_from(*restored)
            else:
                self.loader.load_state_dict(start)  # a rejected checkpoint may have moved it
        if self.world.is_main:
            # Only now: a refused resume must leave the run's recorded config as it was.
            save_config(self.config, self.run_dir / "config.yaml")

    def _refuse_an_occupied_folder(self) -> None:
        steps = self.checkpoints.step_folders()
        if steps:
            raise ConfigError(
                "checkpoint.resume",
                f"'never', but {self.checkpoints.root} already holds checkpoints of another run (steps "
                f"{', '.join(map(str, steps[-5:]))}); a new run there would be mixed with it. Give this run another "
                "run.output_dir, move that folder away, or set checkpoint.resume=auto to continue it",
            )

    def _accept_checkpoint(self, saved: dict[str, Any], path: Path) -> None:
        """Refuses, before any tensor is read, a checkpoint this run cannot continue."""
        check_resumable(saved, self.config, path)
        step, max_steps = int(saved["step"]), self.config.train.max_steps
        if step > max_steps:
            raise ConfigError(
                "train.max_steps",
                f"{max_steps} is below the step of the newest checkpoint ({step}, {path}): there is nothing to "
                "train. Raise train.max_steps to continue, or give a new run another run.output_dir",
            )
        try:
            self.loader.load_state_dict(saved["data"])
        except ValueError as err:
            raise CheckpointError(f"{path}: its data position does not fit this run: {err}") from None

    def _continue_from(self, saved: dict[str, Any], rng: Any) -> None:
        self.step = int(saved["step"])
        if rng is not None:
            set_rng_state(rng)
        # The restored optimizer and schedule carry the old run's settings; this run's apply.
        self.strategy.apply_optimizer_config(self.config.optimizer)
        if not self.world.is_main:
            return
        path = self.checkpoints.root / step_dir_name(self.step)
        logger.info(f"resumed from {path} at step {self.step}"
                    + ("" if rng is not None else f" (written by {saved.get('world_size')} ranks)"))
        changes = changed_settings(saved.get("config") or {}, to_dict(self.config))
        if changes:
            logger.info("settings changed since that checkpoint, applied from now on: " + "; ".join(changes))
        if self.step == self.config.train.max_steps:
            logger.info(f"the run is already at train.max_steps ({self.step}): nothing to train")

    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "world_size": self.world.world_size,
            "strategy": self.config.parallel.strategy,
            "config": to_dict(self.config),
            "data": self.loader.state_dict(),
            "rng": rng_state(),
        }

    # ------------------------------------------------------------------ the loop
    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accumulation`` micro-batches; returns detached means."""
        config = self.config
        draws = self.task.step_draws(_step_generator(config.train.seed, self.step, self.device), self.device)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            start = self.data_rank * self.micro_batch * self.accumulation + micro * self.micro_batch
            rows = slice(start, start + batch["y"].shape[0])
            last = micro == self.accumulation - 1
            with self.strategy.accumulate(last):
                begin_micro_batch(config.parallel)
                with self.autocast:
                    out = self.task.micro_batch_loss(self.strategy.wrapped, batch, draws, rows)
                self.strategy.backward(out["loss"], self.accumulation, last)
            for name, value in out.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / self.accumulation
        self.checkpoints.wait_for_staging()  # the weights must not change under a copy in flight
        totals["grad_norm"] = self.strategy.step().detach().float().to(self.device)
        self.strategy.update_ema(config.train.ema_decay)
        self.step += 1
        return totals

    def fit(self) -> int:
        """Trains to ``train.max_steps``; returns the process exit code (0, or the requeue code)."""
        config = self.config
        batches = iter(self.loader)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        running_loss: float | None = None
        if self.world.is_main:
            logger.info(
                f"training {_model_name(config)} ({sum(p.numel() for p in self.strategy.model.parameters()) / 1e6:.1f}M "
                f"params on this rank) with {_layout(config, self.world.world_size)} on {self.world.world_size} x "
                f"{devices.device_name(self.device)}: global batch {config.train.global_batch_size} = "
                f"{self.micro_batch} x {self.data_world} data-parallel ranks x {self.accumulation} accumulation"
            )
        while self.step < config.train.max_steps:
            reason = self.watcher.should_stop()
            if reason is not None:
                return self._stop_for_requeue(reason)
            totals = self.train_step(batches)
            if self.heartbeat is not None:
                self.heartbeat.step = self.step
            self.checkpoints.poll()
            self.throughput.add(config.train.global_batch_size)
            nonfinite |= ~torch.isfinite(totals["loss"])
            at_log = self.step % config.train.log_every == 0 or self.step == config.train.max_steps
            at_save = config.checkpoint.every and self.step % config.checkpoint.every == 0
            if at_log or at_save:
                self._check_finite(nonfinite)
            if at_log:
                running_loss = self._log(totals, running_loss)
            self.task.after_step(self)
            if at_save and self.step < config.train.max_steps:
                self.checkpoints.save(self.step, self.train_state(), wait=not config.checkpoint.async_save)
        self.checkpoints.save(self.step, self.train_state(), wait=True)
        self._finish()
        return 0

    def _check_finite(self, nonfinite: torch.Tensor) -> None:
        flag = nonfinite.float().reshape(1).cpu()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.world.control_group)
        if flag.item() > 0:
            raise TrainingDiverged(
                f"the loss became NaN or inf before step {self.step}; checkpoints written before that are unaffected "
                "(the newest is resumed automatically). Try a lower optimizer.lr, train.grad_clip > 0, or "
                "train.mixed_precision=fp32."
            )

    def _log(self, totals: dict[str, torch.Tensor], running_loss: float | None) -> float:
        values = all_reduce_mean({k: v for k, v in totals.items() if k != "grad_norm"})
        values["grad_norm"] = float(totals["grad_norm"])
        images_per_s, mfu = self.throughput.read()
        values.update(images_per_s=images_per_s, mfu=mfu, memory_gib=devices.max_memory_gib(self.device),
                      lr=self.strategy.lr())
        if self.loader.bad_samples:
            values["bad_samples"] = self.loader.bad_samples
        factor = self.config.train.loss_spike_factor
        if factor > 0 and running_loss is not None and values["loss"] > factor * running_loss:
            raise TrainingDiverged(
                f"loss spike at step {self.step}: {values['loss']:.4f} > {factor} x the running mean "
                f"{running_loss:.4f} (train.loss_spike_factor); resume from the newest checkpoint with a lower lr"
            )
        terms = tuple(name for name in totals if name not in ("loss", "grad_norm"))
        self.metrics.log(self.step, values, format_progress(self.step, self.config.train.max_steps, values, terms))
        return values["loss"] if running_loss is None else 0.9 * running_loss + 0.1 * values["loss"]

    def _stop_for_requeue(self, reason: str) -> int:
        if self.world.is_main:
            logger.info(f"stopping at step {self.step} ({reason}): saving a checkpoint for the requeue")
        self.checkpoints.save(self.step, self.train_state(), wait=True)
        if self.world.is_main:
            write_requeue_marker(self.run_dir, self.step, reason)
        torch.distributed.barrier(group=self.world.control_group)
        self.close()
        return REQUEUE_EXIT_CODE

    def _finish(self) -> None:
        self.task.finish(self)
        if self.world.is_main:
            plot = save_loss_plot(read_metrics(self.run_dir), self.run_dir / "loss.png")
            if plot:
                logger.info(f"loss curve: {plot}")
        self.close()

    def close(self) -> None:
        self.loader.close()  # stops the data-loader workers before the interpreter exits
        self.checkpoints.close()
        self.metrics.close()
        self.watcher.restore()
        if self.run_lock is not None:
            self.run_lock.release()


def _layout(config: Config, world_size: int) -> str:
    """The strategy, and the mesh when it is not one flat group."""
    replicate, shard, tp = config.parallel.mesh_shape(world_size)
    parts = []
    if replicate > 1:
        kind = "ZeRO++ hpZ" if config.parallel.strategy == "zero3" else "HSDP"
        parts.append(f"{kind}: {replicate} replicas x {shard} shards")
    elif tp > 1:
        parts.append(f"{shard} shards")
    if tp > 1:
        parts.append(f"tensor parallel {tp}")
    return f"{config.parallel.strategy} ({', '.join(parts)})" if parts else config.parallel.strategy


def _model_name(config) -> str:
    return getattr(config.model, "name", type(config.model).__name__)
