"""Live enrolment, revocation and password rotation on a running Mosquitto with the plugin.

``order-enrol … --live`` goes through the dynamic-security control API: no
broker restart, the enrolled device connects at once, a revoked or rotated
device's session ends at once, and nobody else is disconnected. The registry's
accounts file and the broker's copy (which the plugin saves) are two files with
one writer each, and they agree afterwards.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from enrolment.audit import audit
from enrolment.cli import main
from enrolment.control import Control, ControlError, enrol_device, revoke_device
from enrolment.dynsec import (
    CONTROL_TOPIC,
    Accounts,
    device_client_id,
    device_role,
    service_roles,
    verify_password,
)
from enrolment.provision import Registry
from schemas.names import orders_topic
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess, free_port, port_is_open

from ..fleet.mqtt_probe import Probe
from ..test_imports import imported_modules
from .conftest import (
    PASSWORDS,
    SecureBroker,
    bulk_device,
    probe,
    start_secure_broker,
    write_accounts,
)
from .idle_devices import IdleDevices

LIVE_S = 1.0  # the bound: a change takes effect within a second
BAD_CREDENTIALS = (134, 135)  # bad user name or password / not authorized
SLOW = os.environ.get("ENROL_SLOW") == "1"


def _live_args(broker: SecureBroker, tmp_path: Path) -> list[str]:
    secret = tmp_path / "admin.secret"
    secret.write_text(PASSWORDS["admin"] + "\n")
    return [
        "--live", f"mqtts://127.0.0.1:{broker.server.port}",
        "--admin-password-file", str(secret),
        "--admin-ca-file", str(broker.ca.cert),
    ]  # fmt: skip


def _enrol(broker: SecureBroker, tmp_path: Path, device_id: str) -> str:
    """Enrol ``device_id`` live with the CLI; return the password its agent.toml holds."""
    registry = str(tmp_path / "registry")
    url = f"mqtts://127.0.0.1:{broker.server.port}"
    argv = ["--registry", registry, "devices", device_id, "--broker", url]
    assert main([*argv, *_live_args(broker, tmp_path)]) == 0
    config = tomllib.loads((tmp_path / "registry/devices" / device_id / "agent.toml").read_text())
    password = MqttUrl.parse(config["mqtt_url"]).password
    assert password is not None
    return password


def _device(broker: SecureBroker, device_id: str, password: str) -> Probe:
    return Probe(
        broker.server.port, device_id, password,
        ca_file=broker.ca.cert, client_id=device_client_id(device_id),
    )  # fmt: skip


def test_live_enrolment_connects_at_once_without_restart(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """A device enrolled live connects within 1 s; the broker never restarts; kiosk-a stays."""
    pid = secure_broker.server.pid
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as onlooker:
        password = _enrol(secure_broker, tmp_path, "till-9")
        start = time.monotonic()
        with _device(secure_broker, "till-9", password) as device:
            took = time.monotonic() - start
            assert device.connack is not None
            assert device.connack.value == 0
            assert device.publish(orders_topic("till-9"), b"own") < 128  # 16: no subscriber
            assert device.publish(orders_topic("kiosk-a"), b"spoof") == 135  # its role holds
        assert not onlooker.disconnected.is_set()
    assert took < LIVE_S
    assert secure_broker.server.pid == pid
    assert secure_broker.server.running
    # The plugin saved the account into its own file; it agrees with the registry's.
    broker_copy = Accounts.load(secure_broker.conf_dir / "dynamic-security.json")
    registry = Registry(tmp_path / "registry")
    mine = Accounts.load(registry.accounts_path)
    assert verify_password(broker_copy.clients["till-9"], password)
    assert verify_password(mine.clients["till-9"], password)
    assert broker_copy.clients["till-9"].clientid == mine.clients["till-9"].clientid
    assert broker_copy.roles["device:till-9"] == mine.roles["device:till-9"]
    assert broker_copy.roles["admin"] == service_roles()["admin"]  # plugin order = policy order
    assert audit(registry) == []


def test_live_revocation_ends_the_session_and_refuses_reconnect(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """Revoking kiosk-a live closes its session within 1 s; it cannot come back; kiosk-b stays."""
    registry = ["--registry", str(tmp_path / "registry")]
    with (
        probe(secure_broker, "kiosk-b", PASSWORDS["kiosk-b"]) as onlooker,
        probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as victim,
    ):
        assert victim.connack is not None
        assert victim.connack.value == 0
        start = time.monotonic()
        assert main([*registry, "revoke", "kiosk-a", *_live_args(secure_broker, tmp_path)]) == 0
        assert victim.disconnected.wait(LIVE_S * 5)
        ended_s = time.monotonic() - start
        assert not onlooker.disconnected.is_set()
    assert ended_s < LIVE_S
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as again:
        assert again.connack is not None
        assert again.connack.value in BAD_CREDENTIALS
    saved = Accounts.load(secure_broker.conf_dir / "dynamic-security.json")
    assert "kiosk-a" not in saved.clients
    assert "device:kiosk-a" not in saved.roles
    # A second revocation finds nothing: exit 1, as offline.
    assert main([*registry, "revoke", "kiosk-a", *_live_args(secure_broker, tmp_path)]) == 1


def test_live_password_rotation(secure_broker: SecureBroker, tmp_path: Path) -> None:
    """Re-enrolling kiosk-a live ends its old session at once; the old password is refused."""
    with (
        probe(secure_broker, "kiosk-b", PASSWORDS["kiosk-b"]) as onlooker,
        probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as old,
    ):
        start = time.monotonic()
        new_password = _enrol(secure_broker, tmp_path, "kiosk-a")
        assert old.disconnected.wait(LIVE_S * 5)
        ended_s = time.monotonic() - start
        assert not onlooker.disconnected.is_set()
    assert ended_s < LIVE_S
    assert new_password != PASSWORDS["kiosk-a"]
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as stale:
        assert stale.connack is not None
        assert stale.connack.value in BAD_CREDENTIALS
    with _device(secure_broker, "kiosk-a", new_password) as fresh:
        assert fresh.connack is not None
        assert fresh.connack.value == 0


def test_only_the_admin_account_may_use_the_control_topic(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """A device's command is refused (135) and not applied; a wrong admin password is refused."""
    command = b'{"commands":[{"command":"deleteClient","username":"kiosk-b"}]}'
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.publish(CONTROL_TOPIC, command) == 135
    with probe(secure_broker, "bridge", PASSWORDS["bridge"], "bridge-1") as bridge:
        assert bridge.publish(CONTROL_TOPIC, command) == 135
    with probe(secure_broker, "kiosk-b", PASSWORDS["kiosk-b"]) as kept:
        assert kept.connack is not None
        assert kept.connack.value == 0
    url = MqttUrl.parse(f"mqtts://127.0.0.1:{secure_broker.server.port}")
    with pytest.raises(ControlError) as refused:
        Control(url, "wrong", ca_file=secure_broker.ca.cert).__enter__()
    assert refused.value.command == "connect"


@pytest.mark.timeout(900 if SLOW else 120)
def test_enrolments_and_revocations_at_scale_disconnect_nobody_else(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """Enrolled accounts plus 100 live enrolments and 100 revocations: 0 unexpected disconnects.

    Default form: 1,000 accounts, 100 connected; ENROL_SLOW=1: 10,000 and 1,000.
    Ten of the revoked devices are connected: exactly those ten are disconnected.
    The devices use a plaintext loopback listener of the same broker (the plugin
    checks every listener alike) to spare the test TLS handshakes.
    """
    accounts, connected = (10_000, 1_000) if SLOW else (1_000, 100)
    plain_port = free_port()
    broker = start_secure_broker(
        tmp_path / "conf",
        mosquitto_factory,
        lambda d: write_accounts(d, accounts),
        extra_conf=f"\nlistener {plain_port} 127.0.0.1\n",
    )
    ids = [bulk_device(i) for i in range(connected)]
    revoked_online = set(ids[:10])
    revoked = sorted(revoked_online | {bulk_device(accounts - 1 - i) for i in range(90)})
    url = MqttUrl.parse(f"mqtts://127.0.0.1:{broker.server.port}")
    deadline = time.monotonic() + 10  # the TLS port opened first; this one follows
    while not port_is_open(plain_port) and time.monotonic() < deadline:
        time.sleep(0.02)
    with IdleDevices(plain_port) as devices:
        for device_id in ids:
            assert devices.connect(device_id, device_client_id(device_id), "pw") == 0
        with Control(url, PASSWORDS["admin"], ca_file=broker.ca.cert) as control:
            for i in range(100):
                assert enrol_device(control, f"new-{i:03d}", f"pw-{i}")
                assert not devices.watch(0)  # nobody is disconnected by an enrolment
            for device_id in revoked:
                assert revoke_device(control, device_id)
                if device_id in revoked_online:
                    assert devices.wait_ended({device_id}, 5.0) < LIVE_S
        assert devices.watch(0.5) == revoked_online
        assert devices.connect("new-042", device_client_id("new-042"), "pw-42") == 0
        assert devices.connect(ids[0], device_client_id(ids[0]), "pw") in BAD_CREDENTIALS
    saved = Accounts.load(broker.conf_dir / "dynamic-security.json")
    assert len(saved.devices()) == accounts + len(["kiosk-a", "kiosk-b"]) + 100 - 100


def test_live_service_password_reset(
    secure_broker: SecureBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`service bridge --live` ends the bridge's session; the printed password is the new one."""
    registry = ["--registry", str(tmp_path / "registry")]
    with probe(secure_broker, "bridge", PASSWORDS["bridge"], "bridge-1") as bridge:
        assert main([*registry, "service", "bridge", *_live_args(secure_broker, tmp_path)]) == 0
        assert bridge.disconnected.wait(LIVE_S * 5)
    saved = Accounts.load(secure_broker.conf_dir / "dynamic-security.json")
    assert not verify_password(saved.clients["bridge"], PASSWORDS["bridge"])
    printed = capsys.readouterr().out.split("(shown once): ")[1].split()[0]
    assert verify_password(saved.clients["bridge"], printed)
    mine = Accounts.load(tmp_path / "registry/dynamic-security.json")
    assert saved.roles["bridge"] == mine.roles["bridge"] == service_roles()["bridge"]


def test_live_admin_password_reset(
    secure_broker: SecureBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`service admin --live` resets the very account it acts as; the new password works."""
    registry = ["--registry", str(tmp_path / "registry")]
    assert main([*registry, "service", "admin", *_live_args(secure_broker, tmp_path)]) == 0
    printed = capsys.readouterr().out.split("(shown once): ")[1].split()[0]
    url = MqttUrl.parse(f"mqtts://127.0.0.1:{secure_broker.server.port}")
    with Control(url, printed, ca_file=secure_broker.ca.cert) as control:
        assert enrol_device(control, "after-reset", "pw")


def test_live_refuses_before_writing_without_a_password_or_a_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No admin password file, or no broker at the URL: exit 2 and the registry is not made."""
    registry = tmp_path / "registry"
    secret = tmp_path / "admin.secret"
    secret.write_text("pw\n")
    base = ["--registry", str(registry), "devices", "kiosk-1", "--broker", "mqtt://h:1883"]
    live = ["--live", f"mqtt://127.0.0.1:{free_port()}"]
    assert main([*base, *live]) == 2
    assert "--live needs --admin-password-file" in capsys.readouterr().err
    assert main([*base, *live, "--admin-password-file", str(secret)]) == 2
    assert "broker control: connect" in capsys.readouterr().err
    assert not registry.exists()


def test_roles_saved_in_another_rule_order_audit_clean(tmp_path: Path) -> None:
    """A registry written before the policy followed the plugin's order is not 'rights differ'."""
    registry = Registry(tmp_path / "registry")
    argv = ["--registry", str(registry.root), "devices", "kiosk-1", "--broker", "mqtt://h:1883"]
    assert main(argv) == 0
    data = json.loads(registry.accounts_path.read_text())
    (role,) = (r for r in data["roles"] if r["rolename"] == "device:kiosk-1")
    role["acls"].sort(key=lambda acl: acl["acltype"] != "subscribePattern")  # as 0.1.0 wrote
    registry.accounts_path.write_text(json.dumps(data))
    policy = [(a.acltype, a.topic) for a in device_role("kiosk-1").acls]
    assert [(a["acltype"], a["topic"]) for a in role["acls"]] != policy  # the old order
    assert Accounts.load(registry.accounts_path).roles["device:kiosk-1"] == device_role("kiosk-1")
    assert audit(registry) == []


def test_live_enrolment_needs_no_broker_client_library() -> None:
    """The enrol install has no MQTT library, so enrolment imports none: its client is its own."""
    root = Path(__file__).resolve().parents[2]
    imported = {
        module.split(".")[0]
        for path in (root / "enrolment").glob("*.py")
        for module in imported_modules(path, root)
    }
    assert "socket" in imported  # the scan sees control.py's imports
    assert not imported & {"paho", "mqtt5", "aiomqtt", "gmqtt"}
