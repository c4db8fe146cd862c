"""Weights in and out: starting from a published checkpoint, exporting to one.

The published form is a ``torch.save`` dict ``{"model": ..., "ema": ..., "config": ...}``
with the parameter names of the released SFD checkpoints. The same weights can be exported as
``.safetensors`` (``model.<name>`` and ``ema.<name>`` tensors, the config as JSON in the
metadata), which every command that reads weights accepts. Files are read by
:mod:`sfd_train.safe_load`: nothing in them runs.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from sfd_train.config import build_config
from sfd_train.config.registry import task_of_saved
from sfd_train.safe_load import UnsafeFileError, is_safetensors, load_torch_file, read_safetensors
from sfd_train.engine.checkpoint import (
    MARKER,
    TRAIN_STATE,
    CheckpointError,
    CheckpointManager,
    SafeFileSystemReader,
    dcp_load_error,
    list_checkpoints,
    newest_complete,
)
from sfd_train.engine.materialize import local_part
from sfd_train.engine.strategy import ModelState, clean_name, local_tensor
from sfd_train.engine.task import SavedWeights


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops prefixes that other trainers leave in names (DDP's ``module.``, compile's ``_orig_mod.``)."""
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state.items()}


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder ``step_*`` that ``path`` names: itself, or the newest complete one of
    a run folder or its ``checkpoints`` folder.

    Raises:
        CheckpointError: none there (says why).
    """
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if list_checkpoints(root):
        found = newest_complete(root)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint under {root}")
        return found
    if not (path / MARKER).is_file() and not (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"{path}: neither a run folder, nor a checkpoint folder step_*, nor a .pt file")
    return path


def read_checkpoint_weights(path: str | Path, mmap: bool = False
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """``(model, ema or None, config)`` from a published ``.pt`` or one of our checkpoints.

    Args:
        path: a ``.pt`` file (``{"model", "ema"}`` or a bare state dict), a checkpoint
            folder ``step_*``, or a run folder or its ``checkpoints`` folder (the newest
            complete checkpoint in it).
        mmap: map a ``.pt`` file's tensors rather than read them (see
            :func:`~sfd_train.safe_load.load_torch_file`): for callers that read parts of them.

    Raises:
        CheckpointError: the path holds no usable weights; the message says why.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a .pt file, a run folder or a checkpoint folder step_*)")
    if path.is_file() and is_safetensors(path):
        return _read_safetensors_export(path)
    if path.is_file():
        try:
            blob = load_torch_file(path, mmap=mmap)
        except UnsafeFileError as err:
            raise CheckpointError(str(err)) from None
        except Exception as err:
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err})") from None
        if isinstance(blob, dict) and "model" in blob:
            ema, config = blob.get("ema"), blob.get("config")
            # Another trainer's config object was read as an inert record: not ours to use.
            config = config if type(config) is dict else {}
            return _strip(blob["model"]), (_strip(ema) if ema is not None else None), config
        if isinstance(blob, dict) and all(torch.is_tensor(v) for v in blob.values()):
            return _strip(blob), None, {}
        raise CheckpointError(f"{path}: expected a dict with 'model' (and 'ema') or a state dict")
    path = checkpoint_folder(path)
    config = CheckpointManager.read_train_state(path)["config"]
    if (path / "weights.pt").is_file():  # DeepSpeed checkpoints carry their full weights
        weights = load_torch_file(path / "weights.pt", mmap=mmap)
        return weights["model"], weights["ema"], config
    with torch.device("meta"):
        model = model_of_saved_config(config)
    model.to_empty(device="cpu")  # a template: every value comes from the checkpoint
    template = {"model": model.state_dict(), "ema": {k: v.clone() for k, v in model.state_dict().items()}}
    try:
        dcp.load(template, storage_reader=SafeFileSystemReader(path), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP wraps every failure; say which kind
        raise dcp_load_error(path, err) from None
    return template["model"], template["ema"], config


SAFETENSORS_FORMAT = "sfd-train export"


def _read_safetensors_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """``(model, ema or None, config)`` of a ``.safetensors`` export (or a bare safetensors state dict)."""
    try:
        tensors, metadata = read_safetensors(path)
    except Exception as err:  # noqa: BLE001 - a damaged header raises several kinds of errors
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        config = json.loads(metadata.get("config", "{}"))
    except ValueError as err:
        raise CheckpointError(f"{path}: its 'config' metadata is not JSON ({err})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}}
    for key, tensor in tensors.items():
        part, _, name = key.partition(".")
        if part not in parts or not name:
            return _strip(tensors), None, config  # a bare state dict
        parts[part][name] = tensor
    return _strip(parts["model"]), (_strip(parts["ema"]) if parts["ema"] else None), config


def model_of_saved_config(config: dict) -> nn.Module:
    """A freshly built model of the task and size a checkpoint's saved config describes (on the CPU)."""
    entry = task_of_saved(config)
    job = build_config({"task": entry.name, "model": config["model"]})
    return entry.task_class().build_model(job, "cpu")


def load_initial_weights(model: nn.Module, ema: nn.Module, path: str) -> None:
    """Loads ``path``'s weights strictly into ``model`` and its EMA into ``ema`` (the model's weights
    when it has none), each rank its own part of each tensor (``checkpoint.init_from``).

    A checkpoint folder of ours from DDP or FSDP2 is read with DCP: each rank reads only its shards,
    whatever layout wrote them. A ``.pt`` file (or a DeepSpeed checkpoint's full weights) is mapped,
    not read, and each tensor is cut to this rank's part as it is copied, so a rank reads the pages
    of its part; a ``.safetensors`` file is read whole on every rank.

    Args:
        model, ema: materialised, laid out alike (sharded or not), e.g. by
            :func:`~sfd_train.engine.parallelize.parallelize_torch`.

    Raises:
        CheckpointError: the path holds no usable weights, or they do not fit this model (says which).
    """
    where = f"checkpoint.init_from={path}"
    folder = _dcp_checkpoint(Path(path))
    if folder is not None:
        _load_dcp_weights(model, ema, folder, where)
        return
    model_state, ema_state, _ = read_checkpoint_weights(path, mmap=True)  # each rank reads its parts' pages
    _load_whole_tensors(model, model_state, f"{where}: does not fit this model")
    _load_whole_tensors(ema, ema_state if ema_state is not None else model_state,
                        f"{where}: its EMA does not fit this model")


def _dcp_checkpoint(path: Path) -> Path | None:
    """The DCP checkpoint folder ``path`` names (see :func:`checkpoint_folder`), or None for a file or
    a DeepSpeed checkpoint (whose full weights are a file)."""
    if not path.is_dir():
        return None
    folder = checkpoint_folder(path)
    return None if (folder / "weights.pt").is_file() else folder


def _load_dcp_weights(model: nn.Module, ema: nn.Module, folder: Path, where: str) -> None:
    CheckpointManager.read_train_state(folder)  # refuses an unsafe or unreadable train state first
    state = {"model": ModelState(model), "ema": ModelState(ema)}
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder))
    except (Exception, CheckpointException) as err:  # DCP wraps every failure; say which kind
        error = dcp_load_error(folder, err)
        if type(error) is CheckpointError:  # names or shapes differ
            raise CheckpointError(f"{where}: does not fit this model ({str(error).removeprefix(f'{folder}: ')})") from None
        raise error from None


@torch.no_grad()
def _load_whole_tensors(module: nn.Module, state: dict[str, torch.Tensor], refusal: str) -> None:
    """Copies each tensor of ``state`` (whole, by name) into this rank's part of ``module``'s tensor.

    Raises:
        CheckpointError: ``refusal`` and the names missing, unexpected or of another shape.
    """
    state = _strip(state)
    tensors = {clean_name(n): t for n, t in chain(module.named_parameters(), module.named_buffers())}
    expected = {clean_name(name) for name in module.state_dict(keep_vars=True)}  # persistent ones only
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    wrong_shape = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong_shape:
        details = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                   for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong_shape))
                   if names]
        raise CheckpointError(f"{refusal} ({'; '.join(details)})")
    for name in expected:
        local_tensor(tensors[name]).copy_(local_part(state[name], tensors[name]))


EXPORT_FORMATS = ("pt", "safetensors")


def export_published(checkpoint: str | Path, out: str | Path, format: str = "pt") -> Path:
    """Writes one of our checkpoints as its task exports it (:meth:`TrainingTask.export
    <sfd_train.engine.task.TrainingTask.export>`): an SFD model in its published form
    ``{"model", "ema", "config"}``; another task in the form its users read.

    Args:
        format: ``pt`` (``torch.save``, the authors' form) or ``safetensors`` (no pickle at all).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    model_state, ema_state, config = read_checkpoint_weights(checkpoint)
    task = task_of_saved(config).task_class()
    return task.export(SavedWeights(model_state, ema_state, config, Path(checkpoint)), Path(out), format)


def write_published(model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], config: dict,
                    out: Path, format: str) -> Path:
    """``{"model", "ema", "config"}`` with ``torch.save``, or as ``.safetensors`` (``model.*`` and
    ``ema.*`` tensors, the config as JSON metadata)."""
    if format == "safetensors":
        return _write_safetensors_export(model_state, ema_state, config, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model_state, "ema": ema_state, "config": config}, out)
    return out


def _write_safetensors_export(model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor], config: dict,
                              out: Path) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory: the EMA may be the model's own state.
    tensors = {f"model.{k}": v.contiguous() for k, v in model_state.items()}
    tensors.update({f"ema.{k}": v.detach().clone().contiguous() for k, v in ema_state.items()})
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": SAFETENSORS_FORMAT, "config": json.dumps(config)})
    tmp.replace(out)
    return out
