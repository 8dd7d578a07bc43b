"""The ``order-bridge`` command line: the contract's flags, env overrides, bad settings."""

from __future__ import annotations

import argparse

import pytest

from bridge.cli import main
from bridge.config import BridgeConfig, default_client_id
from servicekit.config import add_config_arguments, load_config


def parse(argv: list[str], env: dict[str, str] | None = None) -> BridgeConfig:
    """Settings as the entrypoint builds them."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BridgeConfig)
    return load_config(BridgeConfig, parser.parse_args(argv), env or {})


def test_contract_flags() -> None:
    """--mqtt-url --redis-url --shards --client-id --http-port all exist and convert."""
    config = parse(
        [
            "--mqtt-url", "mqtt://u:p@broker:1883", "--redis-url", "redis://r:6379/0",
            "--shards", "8", "--client-id", "bridge-a", "--http-port", "9200",
        ]
    )  # fmt: skip
    assert (config.mqtt_url, config.redis_url) == ("mqtt://u:p@broker:1883", "redis://r:6379/0")
    assert (config.shards, config.client_id, config.http_port) == (8, "bridge-a", 9200)


def test_flags_beat_environment_and_client_id_defaults_to_host() -> None:
    """A flag wins over ORDERS_*; without either, the client id comes from the host name."""
    config = parse(["--shards", "4"], {"ORDERS_SHARDS": "32", "ORDERS_BATCH_MAX": "50"})
    assert (config.shards, config.batch_max) == (4, 50)
    assert config.client_id == default_client_id()


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A setting that breaks its type is refused before anything starts."""
    assert main(["--shards", "0"]) == 2
    assert "shards" in capsys.readouterr().err
