"""`fleet-sim`'s flags: passwords of an existing stack come from files, never argv."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fleet.runner import add_load_arguments, options_from
from servicekit.errors import ConfigError
from servicekit.urls import MqttUrl


def _options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    return parser.parse_args(list(argv))


def test_password_files_go_into_the_existing_stacks_urls(tmp_path: Path) -> None:
    """--mqtt-password-file and --redis-password-file fill the URLs inside the process;
    a URL that holds a password as well is refused."""
    (tmp_path / "m").write_text("m-secret\n")
    (tmp_path / "r").write_text("r-secret\n")
    args = _options(
        "--mqtt-url", "mqtt://sim@127.0.0.1:1883", "--mqtt-password-file", str(tmp_path / "m"),
        "--redis-url", "redis://sim@127.0.0.1:6379/0", "--redis-password-file", str(tmp_path / "r"),
    )  # fmt: skip
    options = options_from(args)
    assert options.mqtt_url is not None
    assert MqttUrl.parse(options.mqtt_url).password == "m-secret"
    assert options.redis_url == "redis://sim:r-secret@127.0.0.1:6379/0"
    args.mqtt_url = "mqtt://sim:other@127.0.0.1:1883"
    with pytest.raises(ConfigError, match="give it once"):
        options_from(args)
