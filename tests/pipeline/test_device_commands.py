"""``order-pipeline devices retry-held``: one command per device, or one for the fleet.

The PUBACK decides the exit code: 0 delivered, 3 no subscriber (or refused),
4 broker unreachable; 2 for bad usage before anything is sent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from schemas import RETRY_HELD, decode_command, names
from testrig.servers import free_port

from ..fleet.mqtt_probe import Probe


def retry_held(*args: str) -> tuple[int, list[dict[str, object]]]:
    """Run the command as an operator does; its exit code and JSON lines."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "devices", "retry-held", *args],
        capture_output=True, check=False, timeout=60,
    )  # fmt: skip
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize(
    "args", [[], ["kiosk-1", "--all"], ["kiosk/1"], ["kiosk-1", "+"], ["#", "--all"]]
)
def test_bad_usage_sends_nothing_and_exits_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Neither or both of DEVICE_IDs and --all, or a non-id (a wildcard), is refused."""
    assert main(["devices", "retry-held", *args, "--mqtt-url", "mqtt://127.0.0.1:1"]) == 2
    assert "order-pipeline:" in capsys.readouterr().err


def test_each_named_device_gets_its_own_command(mqtt_url: str, device_id: str) -> None:
    """Two devices named: each subscriber gets one retry_held with the id the output names."""
    other = f"{device_id}-b"
    port = int(mqtt_url.rsplit(":", 1)[1])
    with Probe(port) as one, Probe(port) as two:
        assert one.subscribe(names.command_topic(device_id)).value < 128
        assert two.subscribe(names.command_topic(other)).value < 128
        code, lines = retry_held(device_id, other, "--mqtt-url", mqtt_url)
        assert code == 0, lines
        got = [decode_command(p.wait_messages(1)[0].payload) for p in (one, two)]
    assert [(line["device_id"], line["result"], line["puback"]) for line in lines] == [
        (device_id, "delivered", 0),
        (other, "delivered", 0),
    ]
    assert [c.cmd for c in got] == [RETRY_HELD, RETRY_HELD]
    assert [c.id for c in got] == [line["command_id"] for line in lines]
    assert got[0].id != got[1].id


def test_all_sends_one_message_on_the_fleet_topic(mqtt_url: str, device_id: str) -> None:
    """--all publishes once to v1/fleet/cmd; a device's own topic gets nothing."""
    port = int(mqtt_url.rsplit(":", 1)[1])
    with Probe(port) as device:
        assert device.subscribe(names.FLEET_COMMAND_TOPIC).value < 128
        assert device.subscribe(names.command_topic(device_id)).value < 128
        code, lines = retry_held("--all", "--mqtt-url", mqtt_url)
        assert code == 0, lines
        messages = device.wait_messages(2, timeout_s=1.0)
    assert [m.topic for m in messages] == [names.FLEET_COMMAND_TOPIC]
    assert decode_command(messages[0].payload).cmd == RETRY_HELD
    assert [(line["device_id"], line["topic"]) for line in lines] == [
        ("*", names.FLEET_COMMAND_TOPIC)
    ]


def test_a_device_nobody_listens_for_is_reported_and_exits_3(mqtt_url: str, device_id: str) -> None:
    """No session subscribed (unknown device, expired session, older agent): PUBACK 16, exit 3."""
    code, lines = retry_held(device_id, "--mqtt-url", mqtt_url)
    assert code == 3
    assert [(line["result"], line["puback"]) for line in lines] == [("no_subscriber", 16)]


def test_an_unreachable_broker_exits_4() -> None:
    """Nothing listening on the port: exit 4 once --wait-s has passed, and no result lines."""
    code, lines = retry_held("kiosk-1", "--mqtt-url", f"mqtt://127.0.0.1:{free_port()}",
                             "--wait-s", "0.5")  # fmt: skip
    assert (code, lines) == (4, [])
