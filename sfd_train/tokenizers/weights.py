"""Reading released weight files and loading them strictly, with errors that name the key.

The authors load the texture VAE with ``strict=False``, which hides a missing tensor;
here every tensor the network needs must come from the file, every tensor of the file
must be used (or dropped on purpose, by name), and shapes must agree. The first
problem is reported with the file's path, before any work starts.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from sfd_train.safe_load import UnsafeFileError, is_safetensors, load_weights


class TokenizerWeightsError(ValueError):
    """A weight file cannot be used for the network asked for; the message names file and key."""


def read_weight_file(path: str | os.PathLike) -> Any:
    """The object in a ``.pt``/``.pth``/``.ckpt`` (torch) or ``.safetensors`` file.

    Read by :mod:`sfd_train.safe_load`, so nothing in the file runs: an LDM ``.ckpt``'s
    Lightning bookkeeping is kept as inert records (the log says what was left unread), and a
    file that would call anything else is refused unless the user trusts it.

    Raises:
        TokenizerWeightsError: missing, unreadable or not a weight file.
        UnsafeFileError: the file would run code while being read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerWeightsError(f"{path}: no such weight file")
    try:
        return load_weights(path)
    except UnsafeFileError:
        raise
    except Exception as err:  # noqa: BLE001 - torch and safetensors report a damaged file in many ways
        kind = "safetensors" if is_safetensors(path) else "torch"
        raise TokenizerWeightsError(f"{path}: not a readable {kind} file ({type(err).__name__}: {err})") from None


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
