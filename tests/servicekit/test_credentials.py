"""Credentials: secrets come from files or variables, never argv; a Redis URL without a
password is logged loudly."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bridge.config import BridgeConfig
from edge_agent.config import AgentConfig
from servicekit.config import add_config_arguments, load_config
from servicekit.credentials import (
    read_secret_file,
    redis_url_has_password,
    secret_flags,
    url_with_password,
    warn_if_redis_unauthenticated,
)
from servicekit.errors import ConfigError
from servicekit.urls import MqttUrl
from tests.bridge.conftest import BridgeProcess


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://bridge@redis:6379/0", "redis://bridge:@redis:6379/0",
     "rediss://redis:6380/0"],
)  # fmt: skip
def test_url_without_password_warns(url: str) -> None:
    """No password (none, or empty) → one warning naming the problem."""
    assert not redis_url_has_password(url)
    with capture_logs() as logs:
        assert warn_if_redis_unauthenticated(url)
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "redis_url_without_password")
    ]


@pytest.mark.parametrize("url", ["redis://bridge:s3cret@redis:6379/0", "rediss://:pw@r:6380/0"])
def test_url_with_password_is_quiet(url: str) -> None:
    """A password → no warning."""
    with capture_logs() as logs:
        assert not warn_if_redis_unauthenticated(url)
    assert logs == []


@pytest.mark.parametrize(
    ("url", "password", "expected"),
    [
        ("mqtts://bridge@broker:8883", "p@ss:w/rd", "mqtts://bridge:p%40ss%3Aw%2Frd@broker:8883"),
        ("redis://[::1]:6379/0", "pw", "redis://:pw@[::1]:6379/0"),
        ("redis://pipeline@redis:6379/0", "", "redis://pipeline@redis:6379/0"),
    ],
)
def test_a_password_file_goes_into_the_url_encoded(url: str, password: str, expected: str) -> None:
    """The file's password lands in the user info percent-encoded, and parses back whole."""
    assert url_with_password(url, password, "x") == expected
    if password and url.startswith("mqtt"):
        assert MqttUrl.parse(expected).password == password


def test_a_password_given_twice_is_refused_without_echoing_either() -> None:
    """A URL that holds a password plus a password file: a clear error naming the setting."""
    with pytest.raises(ConfigError) as caught:
        url_with_password("redis://u:first-secret@r:6379/0", "second-secret", "redis_url")
    assert caught.value.reason == "password_twice"
    assert "redis_url" in str(caught.value)
    assert "first-secret" not in str(caught.value)
    assert "second-secret" not in str(caught.value)


def test_secret_files_are_read_without_their_newline_and_never_echoed(tmp_path: Path) -> None:
    """One trailing newline is dropped; empty, two-line and missing files are refused, and
    the error names the setting and path, not the content."""
    path = tmp_path / "pw"
    path.write_text("s3cret-value\n")
    assert read_secret_file(str(path), "mqtt_password_file") == "s3cret-value"
    for bad in ("", "\n", "s3cret-value\nmore\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError) as caught:
            read_secret_file(str(path), "mqtt_password_file")
        assert "s3cret" not in str(caught.value)
        assert str(path) in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_secret_file(str(tmp_path / "missing"), "mqtt_password_file")


def test_secret_flags_are_the_url_passwords_and_the_secret_settings() -> None:
    """A URL (or NAME=URL entry) with a password and a given secret setting are found; a
    URL with a user only, and an empty secret, are not."""
    flags = {
        "mqtt_url": "mqtt://bridge:pw@b:1883",
        "redis_url": "redis://bridge@r:6379/0",
        "region_redis": ["a=redis://r:6379/0", "b=rediss://bridge:pw@r2:6379/0"],
        "http_token": "tok",
        "other_token": "",
        "otlp_endpoint": "http://user:pw@collector:4318",
        "shards": None,
    }
    found = secret_flags(flags, ["http_token", "other_token"])
    assert found == ["--http-token", "--mqtt-url", "--otlp-endpoint", "--region-redis"]


def test_load_config_reads_the_password_files_into_every_url(tmp_path: Path) -> None:
    """The bridge's password files fill --mqtt-url, --redis-url and each --region-redis URL
    without a password of its own; the file settings are emptied (workers inherit the URLs)."""
    mqtt = tmp_path / "mqtt"
    mqtt.write_text("m-pw\n")
    redis = tmp_path / "redis"
    redis.write_text("r-pw\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BridgeConfig)
    args = parser.parse_args([
        "--mqtt-url", "mqtts://bridge@b:8883", "--mqtt-password-file", str(mqtt),
        "--redis-url", "redis://bridge@r:6379/0", "--redis-password-file", str(redis),
        "--region", "a", "--region-redis", "b=redis://bridge@rb:6379/0",
        "--region-redis", "c=redis://other:own@rc:6379/0",
    ])  # fmt: skip
    config = load_config(BridgeConfig, args, env={})
    assert MqttUrl.parse(config.mqtt_url).password == "m-pw"
    assert config.region_urls() == {
        "a": "redis://bridge:r-pw@r:6379/0",
        "b": "redis://bridge:r-pw@rb:6379/0",
        "c": "redis://other:own@rc:6379/0",
    }
    assert (config.mqtt_password_file, config.redis_password_file) == ("", "")


def test_the_agent_takes_its_password_and_token_from_files(tmp_path: Path) -> None:
    """edge-agent: --mqtt-password-file fills --mqtt-url and every region's URL;
    --http-token-file gives the token, and with http_token set too it is refused."""
    (tmp_path / "pw").write_text("dev-pw\n")
    (tmp_path / "token").write_text("tok-123\n")
    env = {
        "ORDERS_DEVICE_ID": "kiosk-1",
        "ORDERS_MQTT_PASSWORD_FILE": str(tmp_path / "pw"),
        "ORDERS_HTTP_TOKEN_FILE": str(tmp_path / "token"),
        "ORDERS_REGION": "eu=mqtts://kiosk-1@a:8883,us=mqtts://kiosk-1@b:8883",
    }
    config = load_config(AgentConfig, env=env)
    assert [region.url.password for region in config.regions] == ["dev-pw", "dev-pw"]
    assert config.http_token == "tok-123"
    with pytest.raises(ConfigError, match="http_token and http_token_file"):
        load_config(AgentConfig, env={**env, "ORDERS_HTTP_TOKEN": "other"})


@pytest.mark.parametrize(
    ("module", "argv", "flag"),
    [
        ("bridge.cli", ["--mqtt-url", "mqtt://bridge:hunter2-secret@127.0.0.1:9"], "--mqtt-url"),
        ("bridge.cli", ["--redis-password", "hunter2-secret"], "--redis-password"),
        (
            "pipeline.cli",
            ["worker", "--redis-url", "redis://pipeline:hunter2-secret@r:6379/0"],
            "--redis-url",
        ),
        (
            "edge_agent.cli",
            ["--device-id", "k-1", "--http-token", "hunter2-secret"],
            "--http-token",
        ),
    ],
)
def test_production_refuses_a_secret_on_the_command_line(
    module: str, argv: list[str], flag: str
) -> None:
    """`--production` (or ORDERS_PRODUCTION=true) with a password in a URL flag, or a
    password or token flag: the real command exits 2 naming the flag, before connecting,
    and never echoes the secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
    for extra, extra_env in (["--production"], {}), ([], {"ORDERS_PRODUCTION": "true"}):
        done = subprocess.run(
            [sys.executable, "-m", module, *argv, *extra], env={**env, **extra_env},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert f"{flag} carry a secret on the command line, where every local user" in done.stderr
        assert "hunter2" not in done.stderr + done.stdout


def test_a_password_variable_fills_the_url_and_may_not_come_twice(tmp_path: Path) -> None:
    """ORDERS_REDIS_PASSWORD (compose's form) goes into --redis-url; with a password file
    as well it is refused."""
    env = {"ORDERS_REDIS_URL": "redis://bridge@r:6379/0", "ORDERS_REDIS_PASSWORD": "v-pw"}
    assert load_config(BridgeConfig, env=env).redis_url == "redis://bridge:v-pw@r:6379/0"
    (tmp_path / "pw").write_text("f-pw\n")
    with pytest.raises(ConfigError, match="redis_password and redis_password_file"):
        load_config(BridgeConfig, env={**env, "ORDERS_REDIS_PASSWORD_FILE": str(tmp_path / "pw")})


def test_outside_production_a_secret_flag_is_one_warning_without_the_secret(
    mqtt_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A real bridge given a password inside --mqtt-url still runs, and logs one
    `secret_in_argv` line that names the flag and holds no password."""
    with_password = mqtt_url.replace("mqtt://", "mqtt://someone:hunter2-secret@")
    bridge = BridgeProcess(tmp_path, with_password, redis_url)
    try:
        bridge.start()
    finally:
        bridge.stop()
    lines = bridge.log_path.read_text().splitlines()
    warnings = [json.loads(line) for line in lines if "secret_in_argv" in line]
    assert [(w["level"], w["flags"]) for w in warnings] == [("warning", ["--mqtt-url"])]
    assert not [line for line in lines if "hunter2" in line]
