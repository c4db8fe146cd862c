"""Every command line the README and docs/*.md show for our programs parses with the real parsers,
and the sampling commands among them run as written on a tiny checkpoint (issue 26).

A command is collected from the fenced shell blocks (``bash``, ``sh``, ``console`` or unlabelled) of
each Markdown file: ``sfd-train``, ``sfd-sample``, ``sfd-data``, ``sfd-eval``, ``sfd-launch``, and
``python -m sfd_train...`` or ``torchrun ... -m sfd_train...``; lines continued with ``\\`` are joined,
comments dropped, and in a block with ``$`` prompts only the prompted lines count. Inline code in
prose names commands and flags (``sfd-data --storage-option``) and is not collected. The examples
of every ``--help`` page are checked the same way.

Usage lines are expanded the way a reader reads them: ``{local,slurm}`` is one command per choice,
``[--seed 0]`` is shown (a bare ``[flags]`` stands for more arguments and is dropped), ``a|b`` is one
command per choice, ``...`` is dropped, ``<run>`` is a path, and ``N``, ``G``, ``R`` are numbers.

"Parses" means: the program's own entry point (the console script from the installed entry points,
or the module's ``main``) runs with the words up to the end of argument parsing and stops there,
nothing missing or refused; torchrun's own parser splits its arguments from the module's, as torchrun
would; then every ``section.key=value`` override, and the config it applies to when that is a preset
or an existing file, is validated as the command would validate it. Placeholder paths may be missing.
A brace pattern the shell would expand into several words (an unquoted ``train-{0..9}.tar``) fails too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
PROGRAMS = ("sfd-train", "sfd-sample", "sfd-data", "sfd-eval", "sfd-launch")

# `python -m MODULE` / `torchrun -m MODULE`: the function the module's `__main__` block calls.
MODULE_MAINS = {
    "sfd_train.train": "sfd_train.train:main",
    "sfd_train.sample": "sfd_train.sample:main",
    "sfd_train.cli": "sfd_train.cli:train_main",
    "sfd_train.data_pipeline.cli": "sfd_train.data_pipeline.cli:main",
    "sfd_train.evaluation.cli": "sfd_train.evaluation.cli:main",
    "sfd_train.launchers.cli": "sfd_train.launchers.cli:main",
}
# Where each entry point finishes parsing its arguments: a function returning the namespace, or a
# parser factory (then its parser's parse_args). The test stops the entry point right there.
PARSE_POINTS = {
    "sfd_train.train:parse_args_with_overrides": "namespace",
    "sfd_train.sample:parse_args_with_overrides": "namespace",
    "sfd_train.launchers.cli:parse_args_with_overrides": "namespace",
    "sfd_train.cli:build_export_parser": "parser",
    "sfd_train.data_pipeline.cli:build_parser": "parser",
    "sfd_train.evaluation.cli:build_parser": "parser",
}
# The --help pages whose examples are checked too.
HELP_PAGES = [("sfd-train",), ("sfd-train", "export"), ("sfd-sample",), ("sfd-eval",), ("sfd-launch",),
              *(("sfd-data", command) for command in ("synth", "convert", "extract", "stats", "inspect"))]
NUMBERS = {"N": "4", "G": "8", "R": "0"}  # placeholders of counts and ranks in usage lines
PLACEHOLDER_OVERRIDES = {"key=value"}  # "[key=value ...]" in usage lines

_CHOICES = re.compile(r"(?<!\S)\{([\w-]+(?:,[\w-]+)+)\}(?!\S)")
_OPTIONAL = re.compile(r"(?<!\S)\[([^\[\]]+)\](?!\S)")
_ANGLE = re.compile(r"<(\w[\w ]*)>")
_ALTERNATIVES = re.compile(r"(?<!\S)[\w.-]+(?:\|[\w.-]+)+(?!\S)")
_BRACES = re.compile(r"\{[^{}\s'\"]*(?:,|\.\.)[^{}\s'\"]*\}")
_STARTS_OURS = re.compile(r"^(?:\$ )?(?:\w+=\S*\s+)*(?:sfd-(?:train|sample|data|eval|launch)|torchrun|python3?)(?:\s|$)")


@dataclass(frozen=True)
class DocCommand:
    """One command line of the docs (one variant of a usage line)."""

    where: str  # "README.md:78"
    shown: str  # the line as shown, continuations joined
    words: tuple[str, ...]  # shell words of this variant, from the program on

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def _logical_lines(block: list[str], prompted: bool = False) -> list[tuple[int, str]]:
    """``(index in block, line)`` with continuation lines joined; with ``prompted``, only ``$ `` lines."""
    found, k = [], 0
    while k < len(block):
        first, line = k, block[k].rstrip()
        while line.endswith("\\") and k + 1 < len(block):
            k += 1
            line = line[:-1].rstrip() + " " + block[k].strip()
        k += 1
        line = line.strip()
        if prompted and not line.startswith("$ "):
            continue  # a program's output
        found.append((first, line.removeprefix("$ ")))
    return found


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` for each logical line of the fenced shell blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        i += 1
        if not opening:
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        start = i
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        block, i = lines[start:i], i + 1
        if language in SHELL_LANGUAGES:
            prompted = any(line.lstrip().startswith("$ ") for line in block)
            found += [(start + index + 1, line) for index, line in _logical_lines(block, prompted)]
    return found


def _variants(text: str) -> list[str]:
    """The command lines a usage line stands for (see the module doc)."""
    choice = _CHOICES.search(text)
    if choice:
        return [v for c in choice.group(1).split(",") for v in _variants(text[:choice.start()] + c + text[choice.end():])]
    text = _OPTIONAL.sub(lambda m: "" if re.fullmatch(r"[a-z]+", m.group(1)) else m.group(1), text)
    text = _ANGLE.sub(lambda m: m.group(1).upper().replace(" ", "_"), text)
    # "a|b" words: the first choice of each, then every other choice once
    words = list(_ALTERNATIVES.finditer(text))
    first = _ALTERNATIVES.sub(lambda m: m.group(0).split("|")[0], text)
    out = [first]
    for word in words:
        for other in word.group(0).split("|")[1:]:
            out.append(_ALTERNATIVES.sub(lambda m: other if m.start() == word.start() else m.group(0).split("|")[0], text))
    return out


def shell_expanded(line: str) -> str | None:
    """A brace pattern in ``line`` that the shell would expand into several words (``train-{0..9}.tar``),
    or None. Quoted text, comments and usage-line choices (a whole word ``{local,slurm}``) do not count."""
    bare = re.sub(r"'[^']*'|\"[^\"]*\"", "''", _CHOICES.sub("CHOICE", line))
    match = _BRACES.search(re.split(r"(?:^|\s)#", bare)[0])
    return match.group(0) if match else None


def _number(word: str) -> str:
    if word in NUMBERS:
        return NUMBERS[word]
    flag, eq, value = word.partition("=")
    return f"{flag}={NUMBERS[value]}" if word.startswith("-") and eq and value in NUMBERS else word


def _segments(words: list[str]) -> list[list[str]]:
    """Shell words split at ``|``, ``&&``, ``||`` and ``;``, leading ``VAR=value`` assignments dropped."""
    segments, current = [], []
    for word in [*words, ";"]:
        if word in ("|", "&&", "||", ";"):
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                segments.append(current)
            current = []
        else:
            current.append(word)
    return segments


def _is_ours(words: list[str]) -> bool:
    if words[0] in PROGRAMS or words[0] == "torchrun":
        return True
    return words[0] in ("python", "python3") and words[1:2] == ["-m"] and words[2:3] != [] and words[2].startswith("sfd_train")


def commands_in(path: Path) -> list[DocCommand]:
    """The command lines of our programs that a Markdown file shows."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return _commands([(f"{where}:{number}", line) for number, line in shell_lines(path)])


def _commands(lines: list[tuple[str, str]]) -> list[DocCommand]:
    out: dict[DocCommand, None] = {}  # in order, without repeats
    for where, line in lines:
        if not _STARTS_OURS.match(line):
            continue
        for text in _variants(line):
            lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            for segment in _segments(list(lexer)):
                if _is_ours(segment):
                    out[DocCommand(where, line, tuple(_number(w) for w in segment if w != "..."))] = None
    return list(out)


def all_commands() -> list[DocCommand]:
    return [command for path in DOC_FILES for command in commands_in(path)]


def help_commands() -> list[DocCommand]:
    """The examples of every ``--help`` page: the indented lines under ``examples:``."""
    out = []
    for page in HELP_PAGES:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            _entry_point(page[0])([*page[1:], "--help"])
        lines = printed.getvalue().splitlines()
        start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "examples:"), len(lines))
        end = next((i for i in range(start, len(lines)) if lines[i][:1] not in (" ", "")), len(lines))
        name = " ".join([*page, "--help"])
        out += _commands([(name, line) for _, line in _logical_lines(lines[start:end])])
    return out


# --- parsing with the real entry points ----------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return importlib.import_module(module), name


def _stop_after_parsing() -> contextlib.ExitStack:
    """Patches every parse point so that an entry point raises :class:`_Parsed` right after parsing."""
    stack = contextlib.ExitStack()
    for spec, kind in PARSE_POINTS.items():
        module, name = _resolve(spec)
        real = getattr(module, name)
        if kind == "namespace":
            def parse(*args, _real=real, **kwargs):
                raise _Parsed(_real(*args, **kwargs))
        else:
            def parse(*args, _real=real, **kwargs):
                parser = _real(*args, **kwargs)
                parse_args = parser.parse_args

                def stop(*a, **k):
                    raise _Parsed(parse_args(*a, **k))

                parser.parse_args = stop
                return parser
        stack.enter_context(mock.patch.object(module, name, parse))
    return stack


def _target(words: tuple[str, ...]) -> tuple[str, list[str]]:
    """``(name of the entry point, its argv)`` that a command line runs; torchrun's own parser
    decides which words reach the module, as it does when it starts the ranks."""
    program, argv = words[0], list(words[1:])
    if program in PROGRAMS:
        return program, argv
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        args = _run_parser(get_args_parser().parse_args, argv, "torchrun")
        assert args.module, f"torchrun runs a script ({args.training_script}), not one of our modules"
        return f"-m {args.training_script}", list(args.training_script_args)
    return f"-m {argv[1]}", argv[2:]  # python -m MODULE ...


def _run_parser(parse, argv: list[str], name: str):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv)
    except SystemExit:
        said = errors.getvalue().strip().splitlines()
        raise AssertionError(f"{name} refuses it: {said[-1] if said else ''}") from None


def _entry_point(target: str):
    if target.startswith("-m "):
        module = target[3:]
        assert module in MODULE_MAINS, f"no entry point known for `python -m {module}`: add it to MODULE_MAINS"
        module, name = _resolve(MODULE_MAINS[module])
        return getattr(module, name)
    (script,) = entry_points(group="console_scripts", name=target)
    return script.load()


def parse_command(words: tuple[str, ...]) -> argparse.Namespace | None:
    """Parses a command line with the real entry point; None where it only printed help.

    Raises:
        AssertionError: the parser (or torchrun's) refuses the line, saying why.
    """
    target, argv = _target(words)
    main = _entry_point(target)
    errors = io.StringIO()
    with _stop_after_parsing(), contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as exit:
            code = exit.code
    said = errors.getvalue().strip().splitlines()
    assert code in (0, None) and any(w.startswith(("-h", "--help")) for w in argv), (
        f"{target} refuses it (exit {code}): {said[-1] if said else 'it stopped before parsing its arguments'}")
    return None


def check_config(args: argparse.Namespace) -> None:
    """Validates the overrides of a parsed command, on its config when that is a preset or a file here.

    A bare lower-case name (no '/', no '.') is a preset name and must exist; CONFIG, my_xl.yaml and
    <run>/launch/config.yaml are placeholders.
    """
    from sfd_train.config import load_config
    from sfd_train.config.loader import resolve_config_path

    config = getattr(args, "config", None)
    if config is not None:
        try:
            resolve_config_path(config)
        except Exception:
            assert "/" in config or "." in config or config.isupper(), f"{config!r} is no preset in configs/"
            config = None  # a placeholder file name
    overrides = [o for o in getattr(args, "overrides", None) or [] if o not in PLACEHOLDER_OVERRIDES]
    if overrides or config is not None:
        load_config(config, overrides)


def check_command(words: tuple[str, ...]) -> None:
    args = parse_command(words)
    if args is not None:
        check_config(args)


COMMANDS = all_commands()
HELP_EXAMPLES = help_commands()


def test_the_docs_show_commands_of_every_program():
    """The collection itself works: each program is found, usage lines expand, torchrun forms count."""
    programs = {c.words[0] for c in COMMANDS}
    assert programs >= {*PROGRAMS, "torchrun"}, f"no documented command found for {set(PROGRAMS) - programs}"
    assert len({c.where for c in COMMANDS}) >= 40
    shown = {shlex.join(c.words) for c in COMMANDS}
    assert "sfd-launch local CONFIG key=value --dry-run" in shown  # README's usage line, one per mode
    assert "sfd-launch ascend CONFIG key=value --dry-run" in shown


@pytest.mark.parametrize("command", COMMANDS + HELP_EXAMPLES, ids=lambda c: f"{c.where}:{c.words[0]}")
def test_every_documented_command_parses(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # should an entry point get past parsing, it writes nothing in the repo
    expanded = shell_expanded(command.shown)
    assert expanded is None, f"{command.where}: the shell expands {expanded} into several words; quote it"
    try:
        check_command(command.words)
    except Exception as err:
        pytest.fail(f"{command.where} shows a command that fails:\n  {command.shown}\n  {type(err).__name__}: {err}")


# Mistakes a documented command could make, each with the words the failure must name, and the
# same command without the mistake.
MISTAKES = [
    ("sfd-sample /ckpt/sfd_xl --nmu 4 --out DIR", "--nmu", "sfd-sample /ckpt/sfd_xl --num 4 --out DIR"),
    ("sfd-sample /ckpt/sfd_xl --labels 1 2 --out g.png oops", "'oops' is neither an option nor an override",
     "sfd-sample /ckpt/sfd_xl --labels 1 2 --out g.png sampler.seed=1"),
    ("sfd-sample /ckpt/sfd_xl --out g.png sampler.cfg_scale=1.5", "cfg_scale",
     "sfd-sample /ckpt/sfd_xl --out g.png sampler.cfg_scale_sem=1.5"),
    ("torchrun --nproc-per-node 8 -m sfd_train.sample /ckpt/sfd_xl --num 50000 --out DIR", "ambiguous option: --num",
     "torchrun --nproc-per-node 8 -m -- sfd_train.sample /ckpt/sfd_xl --num 50000 --out DIR"),
    ("sfd-train sfd_xxxl", "'sfd_xxxl' is no preset", "sfd-train sfd_xxl"),
    ("sfd-launch mars tiny", "unknown mode 'mars'", "sfd-launch local tiny"),
    ("sfd-data synth OUT", "--out", "sfd-data synth --out OUT"),
    ("python -m sfd_train.nothing here", "no entry point known", "python -m sfd_train.sample here"),
    ("sfd-eval SAMPLES", "required: reference", "sfd-eval SAMPLES REFERENCE"),
    ("sfd-train tiny data.path=...", "'...' is not valid YAML", "sfd-train tiny data.path=/data/latents"),
]


@pytest.mark.parametrize("broken,named,fixed", MISTAKES, ids=[m[0].split()[0] + f"-{i}" for i, m in enumerate(MISTAKES)])
def test_a_broken_command_is_caught(broken, named, fixed, tmp_path, monkeypatch):
    """The check fails on each kind of mistake, naming the word at fault, and passes without it."""
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    page.write_text(f"Some prose.\n\n```bash\n{broken}   # a comment\n{fixed}\n```\n")
    bad, good = commands_in(page)
    with pytest.raises(Exception, match=re.escape(named)):
        check_command(bad.words)
    check_command(good.words)


def test_an_unquoted_shard_pattern_is_caught():
    assert shell_expanded("sfd-data extract s3://b/train-{000000..000146}.tar --out D") == "{000000..000146}"
    assert shell_expanded("sfd-train tiny launcher.env={A:1,B:2}") == "{A:1,B:2}"
    assert shell_expanded("sfd-data extract 's3://b/train-{000000..000146}.tar' --out D") is None
    assert shell_expanded("sfd-launch {local,slurm} CONFIG   # reads train-{0..9}.tar") is None


# --- the sampling commands, run as written ---------------------------------------------------------

# What the sampling commands' placeholders stand for (a key of the tiny_checkpoint fixture, or the
# test's own folder), and the sizes scaled down to a CPU test. A new placeholder in the docs makes the
# command fail here until it is added.
PLACES = {"/ckpt/sfd_xl": "run", "VAE.ckpt": "vae", "ldm-imagenet256-f16d32-50ep.ckpt": "vae", "/samples/xl": "out"}
SCALED = {"--num": "2", "--nproc-per-node": "1"}


def _sampling(command: DocCommand) -> bool:
    # by its words, not by parsing it: a line that does not parse fails in its own test, not here
    return command.words[0] == "sfd-sample" or "sfd_train.sample" in command.words


SAMPLING = [c for c in COMMANDS if _sampling(c)]


def _as_run_here(words: tuple[str, ...], places: dict[str, str]) -> tuple[str, ...]:
    out = [places.get(word, word) for word in words]
    for index, word in enumerate(out[:-1]):
        if word in SCALED:
            out[index + 1] = SCALED[word]
    return tuple(out)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """What RUN and VAE stand for, tiny: a run folder of a model trained for 2 steps whose texture part
    has the default texture VAE's 32 channels (2x2 latents, 1000 classes, 4 sampler steps), the
    shards it trained on (their statistics de-normalise the samples), and a texture VAE file of the
    default architecture with random weights."""
    from runs import start, write_config
    from sfd_train.data_pipeline.convert import convert_published
    from sfd_train.data_pipeline.testing import make_published_folder
    from sfd_train.tokenizers.config import TextureVAEConfig
    from sfd_train.tokenizers.texture_vae import TextureVAE

    tmp = tmp_path_factory.mktemp("docs_sampling")
    make_published_folder(str(tmp / "published"), counts=(32,), tex_channels=32, sem_channels=4, feature_dim=32, size=2)
    convert_published(str(tmp / "published"), str(tmp / "data"), shard_size=32, progress=False)
    config = write_config(tmp / "job.yaml", model={"in_channels": 36, "semantic_channels": 4, "input_size": 2,
                                                   "num_classes": 1000},
                          data={"path": str(tmp / "data")}, train={"max_steps": 2},
                          sampler={"num_steps": 4, "rtol": 0.5, "atol": 0.1})
    run = start(config, [f"run.output_dir={tmp / 'run'}"], log=tmp / "train.log")
    try:  # the VAE is built while the model trains
        torch.manual_seed(0)
        torch.save(TextureVAE(TextureVAEConfig()).state_dict(), tmp / "vae.ckpt")
    finally:
        code = run.wait(timeout=300)
    assert code == 0, f"training failed ({code}):\n{(tmp / 'train.log').read_text()[-4000:]}"
    return {"run": str(tmp / "run"), "vae": str(tmp / "vae.ckpt")}


@pytest.mark.parametrize("command", SAMPLING, ids=lambda c: c.where)
def test_the_sampling_commands_run_as_written(command, tiny_checkpoint, tmp_path, monkeypatch):
    """README's and the docs' sampling commands, their paths and sizes those of a tiny model, run to the end.

    The entry point runs in this process (the console script's function, or for torchrun the module's
    main with the words torchrun's parser hands it, as rank 0 of one). Overrides after the options take
    effect (plan.json records them), labels are sampled, pictures decoded.
    """
    monkeypatch.chdir(tmp_path)  # a relative --out (grid.png) lands here
    out = tmp_path / "samples"
    words = _as_run_here(command.words, {place: tiny_checkpoint.get(key, str(out)) for place, key in PLACES.items()})
    target, argv = _target(words)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    assert _entry_point(target)(argv) == 0, f"{command.where} failed as written: {shlex.join(words)}"

    args = parse_command(words)
    overrides = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.overrides)}
    if args.num is None:  # a preview grid, its latents beside it
        saved = torch.load(Path(args.out).with_suffix(".pt"), weights_only=True)
        assert Path(args.out).is_file() and saved["labels"].tolist() == args.labels
        assert saved["latents"].shape == (len(args.labels), 36, 2, 2)
        return
    with np.load(Path(args.out) / "samples.npz") as samples:
        assert samples["arr_0"].shape == (2, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
        assert samples["arr_0"].std() > 0
    plan = json.loads((Path(args.out) / "plan.json").read_text())
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        assert plan[section][name] == value, f"{key}={value} did not reach the sampler"
