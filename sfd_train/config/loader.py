"""Loading a :class:`Config` from YAML files and ``key=value`` overrides."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sfd_train.config.base import ConfigError, describe, from_mapping, to_dict
from sfd_train.config.published import is_published_config, translate_published_config
from sfd_train.config.registry import DEFAULT_TASK, get_task
from sfd_train.config.schema import Config

# Presets shipped in configs/ can be named without their path: `sfd-train tiny`.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name: str) -> Path:
    """Finds a config file by path, or by preset name in ``configs/``."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError("", f"config file {name!r} not found (presets: {', '.join(presets) or 'none'})")


class _DuplicateKey(Exception):
    """A mapping in the YAML text gives ``key`` twice, at lines ``first`` and ``second`` (1-based)."""

    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last value, so a second ``train:`` block silently drops the first.
    The check hooks ``flatten_mapping``, which sees each mapping once as written, before merge
    keys (``<<: *base``) are expanded: overriding a merged key is what merges are for.
    """

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # A mapping merged into another is flattened twice (there and when it is built
        # itself), the second time already expanded: check each one once, as written.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_duplicates(node)
        super().flatten_mapping(node)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        """Raises :class:`_DuplicateKey` for the first key of ``node`` given a second time."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # Merge keys are expanded by PyYAML; non-scalar keys are unhashable, which it reports.
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)  # so that `1` and `"1"` differ, `yes` and `true` do not
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key, lines[key], line)
            lines[key] = line


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML file into plain data; names the file on a syntax error or a duplicated key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError("", f"{path}: key {dup.key!r} is given twice (line {dup.first} and line {dup.second}); "
                          "YAML would keep only the second and silently drop the first: merge them into one") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


# What an override looks like on a command line: a dotted key of names, '=', then any value.
OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+)*=")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parses ``section.key=value`` items (values in YAML syntax) into a nested mapping."""
    overrides = list(overrides)
    for item in overrides:
        if not OVERRIDE.match(item):
            raise ConfigError(item, "an override must look like section.key=value")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:  # OmegaConf lets the YAML reader's errors through
            key, _, value = item.partition("=")
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(key, f"the value {value!r} is not valid YAML ({problem}); a string YAML cannot read "
                              f"goes in quotes: {key}=\"'{value}'\"") from None
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError("", f"cannot parse overrides {overrides}: {err}") from None


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                              dest: str = "overrides") -> argparse.Namespace:
    """Parses a command line whose ``section.key=value`` overrides may stand anywhere among the options.

    Every word that looks like an override (:data:`OVERRIDE`) is one, wherever it stands, so an
    option taking several values (``--labels 0 1``) never swallows it; the other words go to
    ``parser.parse_intermixed_args``. A positional word left over for ``dest`` (the parser's
    positional for overrides) is no override: a usage error naming it. ``namespace.<dest>`` gets
    the overrides in their order (the last of a key wins).

    Args:
        parser: the command's parser, with a ``nargs="*"`` positional ``dest`` for the overrides.
        argv: the words after the program name (default ``sys.argv[1:]``).
        dest: the name of that positional.

    Returns:
        The namespace, as ``parser.parse_args`` would return it.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    overrides = [word for word in words if OVERRIDE.match(word)]
    args = parser.parse_intermixed_args([word for word in words if not OVERRIDE.match(word)])
    stray = getattr(args, dest)
    if stray:
        parser.error(f"{stray[0]!r} is neither an option nor an override (overrides look like section.key=value)")
    setattr(args, dest, overrides)
    return args


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(*layers: Mapping[str, Any]) -> Any:
    """Merges nested mappings left to right and validates the result as the config of the task their
    ``task`` key names (:mod:`sfd_train.config.registry`; by default an SFD job, a :class:`Config`)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    root = get_task(merged.get("task", DEFAULT_TASK)).config_class()
    if "task" not in {f.name for f in dataclasses.fields(root)}:
        merged.pop("task", None)  # the key only selected the config class
    return from_mapping(root, merged)


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), notes: list[str] | None = None) -> Config:
    """Loads a config file (ours or the authors') and applies ``key=value`` overrides.

    Args:
        path: a YAML file, a preset name from ``configs/``, or None for the defaults.
        overrides: ``section.key=value`` strings, applied last.
        notes: if given, receives remarks about translated authors' keys.

    Returns:
        The validated config.

    Raises:
        ConfigError: naming the file or the dotted key at fault.
    """
    data: dict[str, Any] = {}
    if path is not None:
        file = resolve_config_path(str(path))
        data = read_yaml(file)
        if is_published_config(data):
            data, remarks = translate_published_config(data)
            if notes is not None:
                notes.extend(remarks)
    return build_config(data, parse_overrides(overrides))


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Writes ``config`` as YAML (it holds no credentials: those come from the environment)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)


def config_help(task: str = DEFAULT_TASK) -> str:
    """Every config key of a task's jobs (see :mod:`sfd_train.config.registry`) with its type, default
    and docstring, for ``--help-config``."""
    root = get_task(task).config_class()
    lines = []
    section = None
    for key, type_name, default, doc in describe(root):
        head = key.split(".", 1)[0]
        if head != section:
            section = head
            lines.append(f"\n[{section}]")
        lines.append(f"  {key} ({type_name}, default {default!r})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines).lstrip("\n")
