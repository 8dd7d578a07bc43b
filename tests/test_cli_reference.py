"""The CLI reference page is generated from the parsers, and every flag explains itself."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import pytest

from scripts import cli_reference
from servicekit.config import ServiceConfig, add_config_arguments, doc


@pytest.fixture(scope="module")
def commands() -> list[cli_reference.Command]:
    """Every console command and subcommand, captured once."""
    return cli_reference.commands()


def test_committed_page_is_current(commands: list[cli_reference.Command]) -> None:
    """docs/reference/cli.md is exactly what the generator renders now."""
    committed = cli_reference.PAGE.read_text() if cli_reference.PAGE.exists() else ""
    assert committed == cli_reference.render(commands), (
        "docs/reference/cli.md is stale: run `make cli-docs`"
    )


def test_check_fails_on_a_stale_page_until_regenerated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check exits 1 on a page that differs; writing the page makes --check pass."""
    page = tmp_path / "reference" / "cli.md"
    page.parent.mkdir()
    page.write_text("# CLI reference\n\nout of date\n")
    assert cli_reference.main(["--check", "--output", str(page)]) == 1
    assert "run `make cli-docs`" in capsys.readouterr().err
    assert cli_reference.main(["--output", str(page)]) == 0
    assert cli_reference.main(["--check", "--output", str(page)]) == 0
    assert page.read_text() == cli_reference.PAGE.read_text()


def test_every_command_and_subcommand_is_on_the_page(
    commands: list[cli_reference.Command],
) -> None:
    """Each console script has a section, and so has each subcommand under it."""
    paths = {command.path for command in commands}
    assert set(cli_reference.scripts()) <= paths
    assert {"order-pipeline catalog load", "edge-agent submit", "fleet-sim stack"} <= paths
    page = cli_reference.render(commands)
    assert page.startswith("# CLI reference\n")
    assert "\n# " not in page  # one top-level heading: the site's nav titles the page by it
    for path in paths:
        assert f"# `{path}`\n" in page


def test_every_flag_says_what_it_does(commands: list[cli_reference.Command]) -> None:
    """No flag, argument or subcommand of any command lacks help text of its own."""
    assert cli_reference.problems(commands) == []


def test_a_flag_without_help_is_caught() -> None:
    """A setting added without doc(), or a plain flag without help, is reported by name."""

    class Settings(ServiceConfig, frozen=True, kw_only=True):
        explained: int = 0
        shards: int = 4

    parser = argparse.ArgumentParser(prog="demo")
    add_config_arguments(parser, Settings)
    parser.add_argument("--rate", type=float, default=2.0, help="orders per second offered")
    found = cli_reference.problems(list(cli_reference.walk("demo", parser, "")))
    assert found == [
        "demo --explained EXPLAINED: help needs at least 4 words of its own",
        "demo --shards SHARDS: help needs at least 4 words of its own",
        "demo --rate RATE: help must end in (default %(default)s)",
    ]


def test_settings_help_carries_env_toml_and_default() -> None:
    """A doc() text is followed by the facts the page splits into columns."""

    class Settings(ServiceConfig, frozen=True, kw_only=True):
        batch_delay_ms: Annotated[
            float, doc("Milliseconds a batch waits to fill, 100% of the time")
        ] = 5.0

    parser = argparse.ArgumentParser(prog="demo")
    add_config_arguments(parser, Settings)
    command = cli_reference.Command("demo", parser, "")
    action = next(a for a in parser._actions if a.dest == "batch_delay_ms")
    explained = cli_reference.split_help(cli_reference.expanded_help(command, action))
    assert explained.text == "Milliseconds a batch waits to fill, 100% of the time"
    assert explained.facts == {
        "env": "ORDERS_BATCH_DELAY_MS",
        "TOML": "batch_delay_ms",
        "default": "5.0",
    }
    assert "100% of the time" in parser.format_help()


def _demo_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a command added later")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go", help="run the demo once").add_argument(
        "--times", type=int, default=1, help="how many runs in a row (default %(default)s)"
    )
    parser.parse_args(argv)
    return 0


def test_a_new_console_script_is_found_without_changes() -> None:
    """Any argparse entry point is captured, its subcommands included, without running it."""
    found = cli_reference.commands({"demo": f"{__name__}:_demo_main"})
    assert [command.path for command in found] == ["demo", "demo go"]
    assert found[0].parser.prog == "demo"
    assert cli_reference.problems(found) == []
    assert "| `--times TIMES` | how many runs in a row | 1 |" in cli_reference.render(found)
