"""Typed configuration machinery shared by every config section.

A section is a plain ``@dataclass`` whose fields carry a type annotation and an
attribute docstring (a string literal on the line after the field, as in
torchtitan). Enumerations are ``typing.Literal`` types. Cross-field rules live in
an optional ``validate(self)`` method that raises :class:`ConfigError`.

:func:`from_mapping` turns a nested mapping (parsed YAML merged with ``key=value``
overrides) into dataclass instances, checking every key and value and naming the
dotted key at fault. :func:`field_docs` reads the attribute docstrings back for
``--help`` output.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, Mapping, Union, get_args, get_origin


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message names the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against annotation ``tp`` and converts where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(key, f"{value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a section (mapping), got {value!r}")
        return from_mapping(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML turns bare words such as `1p0B` into strings but `1` into ints;
            # accept scalars for string fields so overrides need no quoting.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"{value!r} is not a {_type_name(tp)}")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_mapping(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``, validating every key and value.

    Args:
        cls: the dataclass type of the section.
        data: its keys and values; missing keys keep their defaults.
        prefix: dotted path of the section, used in error messages.

    Returns:
        An instance of ``cls`` on which ``validate()`` (if defined) has passed.

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or a value outside
            the allowed set; the message names the dotted key and the allowed values.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(key, f"unknown key; known keys of '{prefix or 'the root'}' are: {', '.join(fields)}")
        default = _section_default(fields[name])
        if default is not None and isinstance(value, Mapping):
            # A section given in part keeps its parent's defaults for the rest (a job type may
            # default a shared section differently, e.g. its optimizer).
            value = {**to_dict(default), **value}
        kwargs[name] = _coerce(value, hints[name], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            if prefix and not err.key.startswith(prefix):
                raise ConfigError(f"{prefix}.{err.key}", str(err).split(": ", 1)[-1]) from None
            raise
    return obj


def _section_default(f: dataclasses.Field) -> Any:
    """The default instance of a section-typed field, or None."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
        return default if dataclasses.is_dataclass(default) else None
    return f.default if dataclasses.is_dataclass(f.default) else None


def to_dict(obj: Any) -> Any:
    """Turns a config (or any nesting of dataclasses, lists, tuples) into plain data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Returns ``{field: docstring}`` from the attribute docstrings in ``cls``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """Lists ``(dotted key, type, default, docstring)`` for every leaf field of ``cls``.

    Args:
        defaults: an instance whose values are the defaults (a section a parent defaults
            differently); None = the class's own defaults.
    """
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = getattr(defaults, f.name) if defaults is not None else _section_default(f)
            rows.extend(describe(tp, key, section))
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((key, _type_name(tp), default, docs.get(f.name, "")))
    return rows
