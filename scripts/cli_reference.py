"""Render the CLI reference page, docs/reference/cli.md, from the commands' own parsers.

    .venv/bin/python scripts/cli_reference.py           # write the page (make cli-docs)
    .venv/bin/python scripts/cli_reference.py --check   # exit 1 if the page is stale

The commands are pyproject.toml's ``[project.scripts]``. Each entry point is called
with ``ArgumentParser.parse_args`` intercepted, so the parser it builds is captured
and nothing runs: a new command, and a new subparser, needs nothing here. A command
that dispatches subcommands by hand before building its parser (``edge-agent
submit``) names them in a module-level ``SUBCOMMANDS`` dict of name → main(argv).

A flag's help may end in facts in parentheses, ``(env ORDERS_SHARDS; TOML shards;
default 16)`` (servicekit.config writes them for every setting); the page shows
them in columns of their own. A flag or subcommand without help of its own is an
error here and in tests/test_cli_reference.py.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NoReturn
from unittest import mock

ROOT: Final = Path(__file__).resolve().parents[1]
PAGE: Final = ROOT / "docs" / "reference" / "cli.md"
MIN_WORDS: Final = 4  # "what it does" needs a few words beyond the facts
FACT_LABELS: Final = ("repeatable", "env", "TOML", "default", "required")
_FACTS: Final = re.compile(r"(?P<text>.*?)\s*\((?P<facts>[^()]*)\)", re.DOTALL)
_MARKDOWN_SPECIAL: Final = re.compile(r"([\\*_|\[\]])")

INTRO: Final = """\
Every flag of every command, generated from the parsers themselves by
`scripts/cli_reference.py` (`make cli-docs`), so this page shows exactly what
`--help` shows. Do not edit it by hand.

The services (`order-bridge`, `order-pipeline`, `edge-agent`) read each setting
from, in order of precedence: its flag, its `ORDERS_*` environment variable, then
its key in the TOML file named by `--config` (or `ORDERS_CONFIG`). A repeatable
flag is given once per value; its variable takes the values comma-separated and
its TOML key a list. A setting with a unit ends in it: `_s` seconds, `_ms`
milliseconds.
"""


@dataclass(frozen=True)
class Help:
    """One action's help split into its text and its facts (``env``, ``default``, …)."""

    text: str
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """A command or subcommand: its words (``order-pipeline catalog load``) and parser."""

    path: str
    parser: argparse.ArgumentParser
    summary: str


def split_help(help_text: str) -> Help:
    """Split the facts in the help's last parentheses off its text.

    Facts are ``label value`` parts separated by ``; ``; parts without a known
    label stay in the text, and parentheses without any known fact are text.
    """
    match = _FACTS.fullmatch(help_text)
    if match is None:
        return Help(help_text.strip())
    facts: dict[str, str] = {}
    other: list[str] = []
    for part in match["facts"].split("; "):
        label, _, value = part.partition(" ")
        if label in FACT_LABELS:
            facts[label] = value
        else:
            other.append(part)
    if not facts:
        return Help(help_text.strip())
    text = match["text"] + (f" ({'; '.join(other)})" if other else "")
    return Help(text.strip(), facts)


def scripts(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """The console commands: name → ``module:function``."""
    with pyproject.open("rb") as file:
        return dict(tomllib.load(file)["project"]["scripts"])


def commands(entry_points: Mapping[str, str] | None = None) -> list[Command]:
    """Every command of ``entry_points`` (default: pyproject's) and all their subcommands."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # document this checkout, whatever is installed
    found: list[Command] = []
    for name, target in (scripts() if entry_points is None else entry_points).items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        parser = capture_parser(name, getattr(module, attribute))
        found += walk(name, parser, parser.description or "")
        for sub_name, sub_main in getattr(module, "SUBCOMMANDS", {}).items():
            sub = capture_parser(f"{name} {sub_name}", sub_main)
            found += walk(f"{name} {sub_name}", sub, sub.description or "")
    return found


class _Captured(BaseException):
    """A signal carrying the parser, not an error: ``except Exception`` lets it through."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(prog: str, main: Callable[..., object]) -> argparse.ArgumentParser:
    """The parser ``main`` builds, taken when it starts parsing (nothing else runs).

    Raises:
        LookupError: ``main`` returned or raised without parsing anything.
    """

    def grab(parser: argparse.ArgumentParser, *_args: object, **_kwargs: object) -> NoReturn:
        raise _Captured(parser)

    takes_argv = bool(inspect.signature(main).parameters)
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", grab),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab),
        mock.patch.object(sys, "argv", [prog]),
    ):
        try:
            main([]) if takes_argv else main()
        except _Captured as captured:
            return captured.parser
    raise LookupError(f"{prog}: {main.__module__}.{main.__qualname__} parsed no arguments")


def walk(path: str, parser: argparse.ArgumentParser, summary: str) -> Iterator[Command]:
    """``parser`` and, depth first, every subparser under it."""
    yield Command(path, parser, summary)
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) not in seen:  # aliases share a parser
                seen.add(id(sub))
                yield from walk(f"{path} {name}", sub, helps.get(name) or sub.description or "")


def _documented(action: argparse.Action) -> bool:
    return not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)


def expanded_help(command: Command, action: argparse.Action) -> str:
    """The help ``--help`` prints for ``action`` (``%(default)s`` and the like filled in)."""
    return argparse.HelpFormatter(command.parser.prog)._expand_help(action)


def invocation(command: Command, action: argparse.Action) -> str:
    """How ``--help`` names the action: ``--shards SHARDS``, ``--x, --no-x``, ``FILE``."""
    return argparse.HelpFormatter(command.parser.prog)._format_action_invocation(action)


def subcommand_helps(command: Command) -> list[tuple[str, str]]:
    """``(name, help)`` of each subcommand directly under ``command``."""
    return [
        (choice.dest, choice.help or "")
        for action in command.parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]


def problems(found: list[Command]) -> list[str]:
    """Flags, arguments and subcommands whose help does not explain them."""
    found_problems = []
    for command in found:
        for action in command.parser._actions:
            if not _documented(action):
                continue
            name = f"{command.path} {invocation(command, action)}"
            explained = split_help(expanded_help(command, action) if action.help else "")
            if len(explained.text.split()) < MIN_WORDS:
                found_problems.append(f"{name}: help needs at least {MIN_WORDS} words of its own")
            defaulted = action.default not in (None, False, argparse.SUPPRESS)
            if action.option_strings and defaulted and "default" not in explained.facts:
                found_problems.append(f"{name}: help must end in (default %(default)s)")
        for sub, sub_help in subcommand_helps(command):
            if len(sub_help.split()) < 2:
                found_problems.append(f"{command.path} {sub}: subcommand without help")
    return found_problems


def _markdown(text: str) -> str:
    """Text for a table cell: code spans kept, Markdown specials escaped elsewhere."""
    parts = text.replace("\n", " ").split("`")
    for index in range(0, len(parts), 2):
        parts[index] = _MARKDOWN_SPECIAL.sub(r"\\\1", parts[index]).replace("<", "&lt;")
    for index in range(1, len(parts), 2):
        parts[index] = parts[index].replace("|", r"\|")
    return "`".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> str:
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] for row in rows)]
    lines = [
        "| " + " | ".join(header[i] for i in keep) + " |",
        "|" + "|".join("---" for _ in keep) + "|",
        *("| " + " | ".join(row[i] for i in keep) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _code_first(fact: str) -> str:
    """``ORDERS_X, comma-separated`` → the variable as code, the note as text."""
    name, sep, note = fact.partition(", ")
    return f"`{name}`{sep}{_markdown(note)}" if name else ""


def _option_row(command: Command, action: argparse.Action) -> list[str]:
    explained = split_help(expanded_help(command, action))
    facts = explained.facts
    flag = f"`{invocation(command, action)}`" + (" (repeatable)" if "repeatable" in facts else "")
    default = "required" if "required" in facts or action.required else facts.get("default", "")
    return [
        flag,
        _markdown(explained.text),
        _code_first(facts.get("env", "")),
        f"`{facts['TOML']}`" if facts.get("TOML") else "",
        _markdown(default),
    ]


def _synopsis(command: Command) -> str:
    actions = [a for a in command.parser._actions if _documented(a)]
    words = [command.path]
    if any(a.option_strings for a in actions):
        words.append("[options]")
    formatter = argparse.HelpFormatter(command.parser.prog)
    words += [formatter._format_args(a, a.dest) for a in actions if not a.option_strings]
    for action in command.parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            words.append("COMMAND" if action.required else "[COMMAND]")
    return " ".join(words)


def render(found: list[Command] | None = None) -> str:
    """The whole page."""
    found = commands() if found is None else found
    out = ["# CLI reference", "", INTRO]
    tables: dict[str, str] = {}  # an options table already shown → the command it is under
    for command in found:
        top = " " not in command.path
        out += [f"{'##' if top else '###'} `{command.path}`", ""]
        if command.summary:
            out += [_markdown(command.summary.strip()), ""]
        out += ["```text", _synopsis(command), "```", ""]
        actions = [a for a in command.parser._actions if _documented(a)]
        arguments = [
            [f"`{invocation(command, a)}`", _markdown(expanded_help(command, a))]
            for a in actions
            if not a.option_strings
        ]
        if arguments:
            out += ["Arguments:", "", _table(["Argument", "What it is"], arguments), ""]
        options = [_option_row(command, a) for a in actions if a.option_strings]
        if options:
            table = _table(["Option", "What it does", "Env", "TOML key", "Default"], options)
            if table in tables:
                out += [f"Options: the same as `{tables[table]}` above.", ""]
            else:
                tables[table] = command.path
                out += ["Options:", "", table, ""]
        subs = subcommand_helps(command)
        if subs:
            out += ["Subcommands:", ""]
            out += [f"- `{command.path} {name}`: {_markdown(text)}" for name, text in subs]
            out += [""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` only compare it; 1 on stale page or missing help."""
    parser = argparse.ArgumentParser(prog="cli_reference.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed page, write nothing"
    )
    parser.add_argument(
        "--output", type=Path, default=PAGE, help="the page to write or check (default %(default)s)"
    )
    args = parser.parse_args(argv)
    output: Path = args.output
    found = commands()
    missing = problems(found)
    if missing:
        print("flags without help:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    page = render(found)
    if args.check:
        if not output.exists() or output.read_text() != page:
            print(f"{output} is stale: run `make cli-docs`", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
