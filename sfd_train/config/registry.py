"""The training tasks, by name: what ``task:`` at the top of a config file selects.

The anchor is torchtitan's ``TrainSpec`` / ``register_train_spec``. A task is one kind of
model the engine trains: a subclass of :class:`sfd_train.engine.task.TrainingTask` that names
its config class, builds its model, checks the data against it, draws a step's random inputs,
computes the loss, exports its weights and writes its periodic outputs. The engine is handed a
task and knows none by name; the config loader, ``--help-config``, ``sfd-train export`` and
``checkpoint.init_from`` look tasks up here.

Entries name their classes as ``"module:Class"`` strings, so that reading a config imports no
model code (and no torch). Adding a task is a package of its own plus one :func:`register_task`
call at the end of this file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from sfd_train.config.base import ConfigError

DEFAULT_TASK = "sfd"
"""The task of a config that names none."""


@dataclass(frozen=True)
class TaskEntry:
    """Where one task lives.

    Attributes:
        name: the value of ``task:`` in a config file.
        config: ``"module:Class"`` of its job config (a dataclass; see :mod:`sfd_train.config.base`).
        task: ``"module:Class"`` of its :class:`~sfd_train.engine.task.TrainingTask`.
        summary: one line for ``--help-config``'s listing.
    """

    name: str
    config: str
    task: str
    summary: str

    def config_class(self) -> type:
        return _resolve(self.config)

    def task_class(self) -> type:
        """The task class (imports the task's package, and with it torch)."""
        return _resolve(self.task)


_TASKS: dict[str, TaskEntry] = {}


def _resolve(where: str) -> Any:
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


def register_task(entry: TaskEntry) -> None:
    """Makes ``entry`` selectable as ``task: <entry.name>``.

    Raises:
        ValueError: a task of that name is registered already.
    """
    if entry.name in _TASKS:
        raise ValueError(f"a training task named {entry.name!r} is registered already ({_TASKS[entry.name].task})")
    _TASKS[entry.name] = entry


def task_names() -> list[str]:
    """The registered names, the default first."""
    return sorted(_TASKS, key=lambda name: (name != DEFAULT_TASK, name))


def describe_tasks() -> str:
    """``sfd (the default): ...; semvae: ...`` for help texts."""
    return "; ".join(f"{name}{' (the default)' if name == DEFAULT_TASK else ''}: {_TASKS[name].summary}"
                     for name in task_names())


def get_task(name: Any) -> TaskEntry:
    """The entry of ``name``.

    Raises:
        ConfigError: no task of that name (names the key ``task`` and the registered tasks).
    """
    if not isinstance(name, str) or name not in _TASKS:
        raise ConfigError("task", f"{name!r} is not a task; choose one of: {describe_tasks()}")
    return _TASKS[name]


def task_of_config(config: Any) -> TaskEntry:
    """The entry whose config class ``config`` is an instance of."""
    for name in task_names():
        if type(config) is _TASKS[name].config_class():
            return _TASKS[name]
    raise TypeError(f"{type(config).__name__} is the config of no registered training task")


def task_of_saved(saved: dict[str, Any]) -> TaskEntry:
    """The entry of a config saved in a checkpoint (a plain dict; its ``task`` key, or the default)."""
    return get_task(saved.get("task", DEFAULT_TASK))


# ------------------------------------------------------------------ the tasks of this project
register_task(TaskEntry(
    name="sfd",
    config="sfd_train.config.schema:Config",
    task="sfd_train.diffusion.training:SFDTask",
    summary="the dual-timestep SFD diffusion model on composite latents",
))
register_task(TaskEntry(
    name="semvae",
    config="sfd_train.config.semvae:SemVAEJobConfig",
    task="sfd_train.tokenizers.training:SemVAETask",
    summary="the Semantic VAE over DINOv2 features (preset: semvae_ch16)",
))
