"""Layered settings: flags > ORDERS_* environment > TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from servicekit.config import ConfigError, ServiceConfig, add_config_arguments, load_config
from servicekit.errors import ConfigError as UrlConfigError
from servicekit.urls import MqttUrl, redact


class DemoConfig(ServiceConfig, frozen=True, kw_only=True):
    """A service's settings, as each service declares them."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    shards: int = 16
    tls_insecure: bool = False


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse argv with the flags generated from DemoConfig."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DemoConfig)
    return parser.parse_args(argv)


def test_precedence_is_flags_then_env_then_file(tmp_path: Path) -> None:
    """Each layer overrides the one below only for the keys it sets."""
    toml = tmp_path / "svc.toml"
    toml.write_text('mqtt_url = "mqtt://file:1883"\nshards = 4\nlog_level = "debug"\n')
    env = {"ORDERS_SHARDS": "8", "ORDERS_MQTT_URL": "mqtt://env:1883"}
    config = load_config(
        DemoConfig, parse(["--config", str(toml), "--mqtt-url", "mqtt://flag"]), env
    )
    assert config == DemoConfig(mqtt_url="mqtt://flag", shards=8, log_level="debug")


def test_defaults_apply_and_bool_flags_work() -> None:
    """With nothing set, defaults hold; --tls-insecure flips a bool."""
    assert load_config(DemoConfig, parse([]), {}) == DemoConfig()
    assert load_config(DemoConfig, parse(["--tls-insecure"]), {}).tls_insecure is True


def test_config_file_from_env_and_unknown_keys_refused(tmp_path: Path) -> None:
    """ORDERS_CONFIG names the file; a typo in it is an error, not ignored."""
    toml = tmp_path / "svc.toml"
    toml.write_text("shardz = 4\n")
    with pytest.raises(ConfigError, match="shardz"):
        load_config(DemoConfig, parse([]), {"ORDERS_CONFIG": str(toml)})


def test_wrong_types_are_config_errors() -> None:
    """A non-integer shard count is refused with the field named."""
    with pytest.raises(ConfigError, match="shards"):
        load_config(DemoConfig, parse(["--shards", "many"]), {})


def test_config_is_frozen() -> None:
    """Services get one immutable settings object."""
    config = DemoConfig()
    with pytest.raises(AttributeError):
        config.shards = 2  # type: ignore[misc]


def test_mqtt_urls_parse_and_never_show_the_password() -> None:
    """mqtt:// and mqtts:// URLs parse; the password stays out of str and repr."""
    url = MqttUrl.parse("mqtts://dev%2D1:s3cret@broker.example:9883")
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "broker.example", 9883, True, "dev-1", "s3cret",
    )  # fmt: skip
    assert "s3cret" not in str(url) + repr(url)
    assert MqttUrl.parse("mqtt://h").port == 1883
    assert redact("redis://u:pw@h:6379/0") == "redis://u:***@h:6379/0"
    with pytest.raises(UrlConfigError, match="scheme"):
        MqttUrl.parse("http://h")
