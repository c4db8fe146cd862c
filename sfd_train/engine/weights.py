"""Weights in and out: starting from a published checkpoint, exporting to one.

The published form is a ``torch.save`` dict ``{"model": ..., "ema": ..., "config": ...}``
with the parameter names of the released SFD checkpoints. The same weights can be exported as
``.safetensors`` (``model.<name>`` and ``ema.<name>`` tensors, the config as JSON in the
metadata), which every command that reads weights accepts. Files are read by
:mod:`sfd_train.safe_load`: nothing in them runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from sfd_train.config import build_config
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


def read_checkpoint_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    """``(model, ema or None, config)`` from a published ``.pt`` or one of our checkpoints.

    Args:
        path: a ``.pt`` file (``{"model", "ema"}`` or a bare state dict), a checkpoint
            folder ``step_*``, or a run folder or its ``checkpoints`` folder (the newest
            complete checkpoint in it).

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
            blob = load_torch_file(path)
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
        weights = load_torch_file(path / "weights.pt")
        return weights["model"], weights["ema"], config
    model = model_of_saved_config(config)
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
    """A freshly built model of the kind and size a checkpoint's saved config describes."""
    job = build_config({"task": config.get("task", "sfd"), "model": config["model"]})
    if config.get("task") == "semvae":
        from sfd_train.tokenizers.semvae import SemVAE

        return SemVAE(job.model)
    from sfd_train.models import build_model

    return build_model(job.model)


def load_initial_weights(model: nn.Module, path: str) -> dict[str, torch.Tensor] | None:
    """Loads ``path``'s model weights strictly into ``model``; returns its EMA weights (or None).

    Raises:
        CheckpointError: the names or shapes do not match this model (says which).
    """
    model_state, ema_state, _ = read_checkpoint_weights(path)
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint.init_from={path}: does not fit this model: {err}") from None
    if ema_state is not None:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        extra_or_missing = sorted(set(ema_state) ^ set(expected))
        wrong_shape = sorted(k for k, v in ema_state.items() if k in expected and v.shape != expected[k])
        if extra_or_missing or wrong_shape:
            raise CheckpointError(
                f"checkpoint.init_from={path}: its EMA does not fit this model "
                f"(names: {extra_or_missing[:3]}, shapes: {wrong_shape[:3]})"
            )
    return ema_state


EXPORT_FORMATS = ("pt", "safetensors")


def export_published(checkpoint: str | Path, out: str | Path, format: str = "pt") -> Path:
    """Writes one of our checkpoints in its published form: ``{"model", "ema", "config"}`` for an SFD
    model, the authors' SemVAE checkpoint format for a SemVAE (its EMA weights, which equal the
    model's with the recipe's ``train.ema_decay: 0``).

    Args:
        format: ``pt`` (``torch.save``, the authors' form) or ``safetensors`` (``model.*`` and
            ``ema.*`` tensors, the config as JSON metadata; no pickle at all).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    model_state, ema_state, config = read_checkpoint_weights(checkpoint)
    out = Path(out)
    if config.get("task") == "semvae":
        from sfd_train.tokenizers.semvae import export_semvae

        model = model_of_saved_config(config)
        model.load_state_dict(ema_state if ema_state is not None else model_state, strict=True)
        step = CheckpointManager.read_train_state(checkpoint_folder(Path(checkpoint)))["step"]
        return Path(export_semvae(model, out, iteration=int(step), format=format))
    if format == "safetensors":
        return _write_safetensors_export(model_state, ema_state if ema_state is not None else model_state, config, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blob: dict[str, Any] = {"model": model_state, "ema": ema_state if ema_state is not None else model_state,
                            "config": config}
    torch.save(blob, out)
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
