"""Filling the shell templates in ``templates/`` and writing the results.

Templates are plain bash files with ``{{NAME}}`` placeholders, so they read (and
lint) like the scripts they become. Every value is inserted verbatim: callers quote
what reaches the shell with :func:`q`. A placeholder without a value, or a value
without a placeholder, is a bug and raises at once rather than producing a script
that fails on a cluster hours later.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")


def q(value: object) -> str:
    """``value`` quoted as one shell word (left bare when that is already safe)."""
    return shlex.quote(str(value))


def join_words(words: Iterable[object]) -> str:
    """Quotes and joins ``words`` into a shell command line."""
    return " ".join(q(w) for w in words)


def fill(template: str, values: Mapping[str, str]) -> str:
    """Returns template file ``template`` with every ``{{NAME}}`` replaced by ``values[NAME]``.

    Raises:
        KeyError: a placeholder has no value, or a value has no placeholder.
    """
    text = (TEMPLATE_DIR / template).read_text(encoding="utf-8")
    used = set(_PLACEHOLDER.findall(text))
    missing = sorted(used - set(values))
    unused = sorted(set(values) - used)
    if missing or unused:
        raise KeyError(f"template {template}: no value for {missing}, no placeholder for {unused}")
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    # An optional block that renders empty leaves blank lines behind: keep at most one.
    return re.sub(r"\n{3,}", "\n\n", text)


def block(lines: Iterable[str]) -> str:
    """Joins shell lines into one block for a placeholder on a line of its own."""
    return "\n".join(lines)


def write_script(path: Path, text: str, executable: bool = True) -> None:
    """Writes ``text`` to ``path`` atomically (several nodes may render the same file at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
