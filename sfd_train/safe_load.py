"""Reading weight and state files without running code from them.

A torch file is a pickle, and the full unpickler (``torch.load(weights_only=False)``) calls
whatever callable the file names: a downloaded checkpoint can run a shell command while it is
read. Every file this project reads (published checkpoints, exports, tokenizer weights, the
Inception weights, our own train states, DCP metadata, caches) goes through this module:

1. torch's own restricted reader (``weights_only=True``): tensors, containers, plain values.
2. A file that names other globals is read by a restricted unpickler that calls nothing but
   what (1) allows plus NumPy's array and scalar constructors (and, per call, a caller's own
   list, e.g. DeepSpeed's bookkeeping classes for its checkpoints). The bookkeeping objects
   training frameworks store beside the tensors (Lightning's ``hyper_parameters`` and callback
   keys, OmegaConf containers, ``argparse.Namespace``) become :class:`InertRecord`\\ s: their
   classes are neither imported nor constructed, their data is kept, and the log names what was
   left unread. Any other global refuses the file: :class:`UnsafeFileError` names the file and
   the globals.
3. Only when the user says they trust their files (``SFD_TRUST_CHECKPOINTS=1``, or the
   ``--trust-checkpoint`` flag of our commands, which sets it) does the full unpickler run.

Safetensors files hold no code at all and are read directly.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import pickle
import zipfile
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import torch

# torch is imported where files are read, so that the commands' --help (which add the trust
# flag from here) stay fast.
logger = logging.getLogger("sfd_train")

TRUST_ENV = "SFD_TRUST_CHECKPOINTS"
TRUST_FLAG = "--trust-checkpoint"

# Classes training frameworks pickle as bookkeeping beside the tensors. They are read as
# inert records (never imported, never constructed), so listing a module here cannot make a
# file run code; it only lets a file that carries them be read without the trust switch.
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
_INERT_NAMES = frozenset({"argparse.Namespace", "typing.Any", "pathlib.WindowsPath", "pathlib._local.WindowsPath"})

# File paths (DCP's metadata holds one): plain data, constructed for real.
_PATH_CLASSES = frozenset({"Path", "PosixPath", "PurePath", "PurePosixPath"})

# NumPy arrays and scalars (the authors' reference data, old RNG states): NumPy's own
# constructors, which build arrays from bytes and call nothing from the file.
_NUMPY_FUNCTIONS = frozenset({"_reconstruct", "scalar"})
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafeFileError(ValueError):
    """A file would run code while being read; the message names it, the globals and the switch."""

    PHRASE = ": refused: reading it would call "
    ENDING = "see docs/reliability.md)"
    """Every message holds PHRASE and ends with ENDING; libraries that turn errors into text (DCP) keep both."""

    def __init__(self, path: str, names: Iterable[str]):
        self.path, self.names = str(path), sorted(set(names))
        super().__init__(
            f"{self.path}{self.PHRASE}{', '.join(self.names)}, which is not a tensor, container "
            "or plain value, so the file could run code on this machine. If you trust where this file comes from, "
            f"pass {TRUST_FLAG} or set {TRUST_ENV}=1 (that reads it with the full unpickler; {self.ENDING}")


class InertRecord(dict):
    """Stands for an object of a class this project never constructs from a file.

    The unpickler hands it the class's arguments and state instead of calling the class: dict
    items land in the record itself, list items in ``items``, the rest in ``args`` and ``state``.
    """

    type_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        record = dict.__new__(cls)
        record.args, record.state, record.items = args, None, []
        return record

    def __init__(self, *args: Any, **kwargs: Any):  # noqa: D107 - nothing to build
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.items.extend(items)

    def __repr__(self) -> str:
        return f"<{self.type_name}, not read>"

    __hash__ = object.__hash__  # records can be dict keys (old Lightning callbacks are keyed by class)


def _inert_class(full_name: str) -> type[InertRecord]:
    return type(full_name.rsplit(".", 1)[-1], (InertRecord,), {"type_name": full_name})


def trusted() -> bool:
    """Whether the user has said they trust the files they give us (``SFD_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--trust-checkpoint`` to a command that reads weight or checkpoint files."""
    parser.add_argument(
        TRUST_FLAG, action="store_true",
        help=f"read weight and checkpoint files with torch's full unpickler (same as {TRUST_ENV}=1). Such a file "
        "can run any code while it is read: use it only for files from a source you trust, and only if a file is "
        "refused without it")


def apply_trust_argument(args: argparse.Namespace) -> None:
    """Turns ``--trust-checkpoint`` into the environment switch (inherited by ranks and workers)."""
    if getattr(args, "trust_checkpoint", False):
        os.environ[TRUST_ENV] = "1"


class _Globals:
    """Resolves a global a file names: allowed for real, read as inert, or refused."""

    def __init__(self, allowed: dict[str, Any] | None = None):
        from torch import _weights_only_unpickler  # torch's own allowlist of safe globals (private, stable)

        self.allowed = dict(_weights_only_unpickler._get_allowed_globals())
        # A tensor inside a plain pickle is a torch file in bytes, which torch's own hook reads
        # with the full unpickler: read it with these rules instead.
        self.allowed["torch.storage._load_from_bytes"] = _tensor_from_bytes
        self.allowed.update(allowed or {})
        self.inert: dict[str, type[InertRecord]] = {}
        self.refused: set[str] = set()

    def resolve(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        numpy_global = _numpy_global(module, name)
        if numpy_global is not None:
            return numpy_global
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            import pathlib

            return getattr(pathlib, name)
        if full in _INERT_NAMES or (module + ".").startswith(_INERT_MODULE_PREFIXES):
            return self.inert.setdefault(full, _inert_class(full))
        self.refused.add(full)
        raise pickle.UnpicklingError(f"global {full} is not allowed")


def _tensor_from_bytes(data: bytes) -> Any:
    return load_torch_file(io.BytesIO(data), name="a tensor inside a pickle")


def _numpy_global(module: str, name: str) -> Any | None:
    """NumPy's array/scalar constructors, dtypes and the ndarray type, or None."""
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if module in _NUMPY_MODULES and name in _NUMPY_FUNCTIONS:
        try:
            from numpy._core import multiarray
        except ImportError:  # NumPy 1.x
            from numpy.core import multiarray
        return getattr(multiarray, name)
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        found = getattr(np.dtypes, name, None)
        return found if isinstance(found, type) and issubclass(found, np.dtype) else None
    return None


def _restricted_pickle_module(resolver: _Globals) -> SimpleNamespace:
    """A ``pickle``-like module whose unpickler calls only what ``resolver`` allows."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:  # the only way a pickle reaches a callable
            return resolver.resolve(module, name)

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(Unpickler=Unpickler, load=load, __name__="sfd_restricted_pickle")


def _unread(obj: Any, where: str = "", found: list[str] | None = None) -> list[str]:
    """``where (type)`` of every inert record in ``obj``."""
    found = [] if found is None else found
    if isinstance(obj, InertRecord):
        found.append(f"{where or 'the whole file'} ({obj.type_name})")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            label = key.type_name if isinstance(key, type) and issubclass(key, InertRecord) else key
            _unread(value, f"{where}.{label}" if where else str(label), found)
            if isinstance(key, type) and issubclass(key, InertRecord) and f"key {key.type_name}" not in found:
                found.append(f"key {key.type_name}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _unread(value, f"{where}[{index}]", found)
    return found


def load_torch_file(path: str | os.PathLike | io.BytesIO, *, map_location: Any = "cpu",
                    allowed: dict[str, Any] | None = None, name: str | None = None, mmap: bool = False) -> Any:
    """The object in a ``torch.save`` file, read without running code from it.

    Args:
        path: the file (or an in-memory buffer).
        map_location: as for ``torch.load``.
        allowed: extra globals, full name -> object, that this caller knows to be plain data
            classes (constructed for real).
        name: how to name an in-memory buffer in messages.
        mmap: map the tensors' bytes instead of reading them (``torch.load``'s ``mmap``; files in
            torch's zip format only, others are read): pages are read when touched, and processes
            reading the same file share them.

    Returns:
        The loaded object; bookkeeping objects of other frameworks appear as :class:`InertRecord`.

    Raises:
        UnsafeFileError: the file names a global outside the lists above (and the user has not
            set the trust switch).
        Anything ``torch.load`` raises for a damaged file.
    """
    import torch

    label = name or (os.fspath(path) if not isinstance(path, io.BytesIO) else "<buffer>")
    mapped = {"mmap": True} if mmap and not isinstance(path, io.BytesIO) and zipfile.is_zipfile(path) else {}
    if trusted():
        logger.warning(f"{label}: read with the full unpickler ({TRUST_ENV}=1): it may run code from the file")
        _rewind(path)
        return torch.load(path, map_location=map_location, weights_only=False, **mapped)
    if not allowed:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, **mapped)
        except pickle.UnpicklingError:
            pass  # names other globals: the restricted unpickler below tells harmless from not
    resolver = _Globals(allowed)
    _rewind(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=_restricted_pickle_module(resolver), **mapped)
    except pickle.UnpicklingError:
        if resolver.refused:
            raise UnsafeFileError(label, resolver.refused | _other_unsafe_globals(path, resolver)) from None
        raise
    unread = _unread(blob)
    if unread:
        logger.info(f"{label}: left unread (kept as inert records, their classes not run): {'; '.join(unread)}")
    return blob


def _rewind(path: Any) -> None:
    if isinstance(path, io.IOBase):
        path.seek(0)


def _other_unsafe_globals(path: Any, resolver: _Globals) -> set[str]:
    """Every global of a torch zip file the resolver would refuse (the message names them all)."""
    import torch

    try:
        _rewind(path)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file: the first refused name is enough
        return set()
    refused = set()
    for full in names:
        module, _, name = full.rpartition(".")
        try:
            resolver.resolve(module, name)
        except pickle.UnpicklingError:
            refused.add(full)
    return refused


def loads_pickle(data: bytes | io.IOBase, *, allowed: dict[str, Any] | None = None, name: str = "<pickle>") -> Any:
    """A plain pickle (not a torch file), read with the same rules as :func:`load_torch_file`.

    Args:
        data: the pickle's bytes, or an open binary file.
        allowed: extra globals, full name -> object, that are plain data classes (constructed for real).
        name: how to name the data in messages.
    """
    if trusted():
        return pickle.loads(data) if isinstance(data, (bytes, bytearray)) else pickle.load(data)
    resolver = _Globals(allowed)
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        return _restricted_pickle_module(resolver).load(stream)
    except pickle.UnpicklingError:
        if resolver.refused:
            raise UnsafeFileError(name, resolver.refused) from None
        raise


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file (which holds no code by design)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as file:
        return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a ``.safetensors`` file (its header only)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as file:
        return dict(file.metadata() or {})


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def load_weights(path: str | os.PathLike, **kwargs: Any) -> Any:
    """A ``.safetensors`` file's tensors, or a torch file's object read by :func:`load_torch_file`."""
    return read_safetensors(path)[0] if is_safetensors(path) else load_torch_file(path, **kwargs)

