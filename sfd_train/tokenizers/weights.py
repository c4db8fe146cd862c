"""Reading released weight files and loading them strictly, with errors that name the key.

The authors load the texture VAE with ``strict=False``, which hides a missing tensor;
here every tensor the network needs must come from the file, every tensor of the file
must be used (or dropped on purpose, by name), and shapes must agree. The first
problem is reported with the file's path, before any work starts.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Mapping

import torch
from torch import nn

logger = logging.getLogger("sfd_train")


class TokenizerWeightsError(ValueError):
    """A weight file cannot be used for the network asked for; the message names file and key."""


def read_weight_file(path: str | os.PathLike) -> Any:
    """The object in a ``.pt``/``.pth``/``.ckpt`` (torch) or ``.safetensors`` file.

    Tries torch's safe loader first. Files written by training frameworks (an LDM
    ``.ckpt`` holds Lightning objects) need the full unpickler, which runs code from the
    file: that is done only for a file the user named, and logged.

    Raises:
        TokenizerWeightsError: missing, unreadable or not a weight file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerWeightsError(f"{path}: no such weight file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - any corruption
            raise TokenizerWeightsError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.info(f"{path}: holds more than tensors; reading it with the full unpickler")
    except Exception as err:  # noqa: BLE001 - torch reports a damaged zip in many ways
        raise TokenizerWeightsError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise TokenizerWeightsError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None


def tensors_of(blob: Any, path: str, keys: tuple[str, ...] = ("state_dict", "model", "model_state_dict")) -> dict[str, torch.Tensor]:
    """The state dict inside ``blob``: the blob itself, or under the first of ``keys`` it has."""
    if isinstance(blob, Mapping):
        for key in keys:
            if isinstance(blob.get(key), Mapping):
                blob = blob[key]
                break
        if blob and all(torch.is_tensor(v) for v in blob.values()):
            return dict(blob)
    raise TokenizerWeightsError(f"{path}: holds no state dict (looked at the top level and under {', '.join(keys)})")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Loads ``state`` into ``module``; raises naming the file and the first key that does not fit.

    Args:
        what: the network expected, for the message (e.g. "the texture VAE").
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing key '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(f"unexpected key '{unexpected[0]}'"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    if wrong:
        key = wrong[0]
        problems.append(f"key '{key}' has shape {tuple(state[key].shape)}, the network needs {tuple(expected[key].shape)}"
                        + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise TokenizerWeightsError(f"{path}: not the weights of {what} as configured: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
