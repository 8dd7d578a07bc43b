"""`fleet-sim provision`: enrolled devices connect to the secure broker, revoked ones cannot."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fleet.cli import main
from fleet.passwd import read_passwd
from fleet.provision import ProvisionError, Registry
from schemas.names import orders_topic
from servicekit.urls import MqttUrl

from .conftest import SecureBroker
from .mqtt_probe import Probe


def device_probe(broker: SecureBroker, directory: Path) -> Probe:
    """A client set up from nothing but an enrolled device's files."""
    settings = tomllib.loads((directory / "agent.toml").read_text())
    url = MqttUrl.parse(settings["mqtt_url"])
    assert url.tls
    return Probe(
        broker.server.port, url.username, url.password, ca_file=directory / "ca.crt",
        client_cert=(directory / "client.crt", directory / "client.key"),
    )  # fmt: skip


def test_enrolled_device_connects_and_revoked_device_is_refused(
    secure_broker: SecureBroker,
) -> None:
    """Enrol → connect over TLS with password and client cert; revoke + SIGHUP → refused."""
    registry = Registry(secure_broker.conf_dir)
    [enrolment] = registry.enrol(
        ["kiosk-new"], broker_url="mqtts://localhost:8883", ca=secure_broker.ca,
        client_certs=True,
    )  # fmt: skip
    assert (enrolment.directory / "agent.toml").stat().st_mode & 0o777 == 0o600
    secure_broker.server.reload()
    with device_probe(secure_broker, enrolment.directory) as device:
        assert device.connack is not None
        assert not device.connack.is_failure
        assert device.publish(orders_topic("kiosk-new"), b"hello") < 128  # 16: no subscribers
    assert registry.revoke(["kiosk-new"]) == ["kiosk-new"]
    assert "kiosk-new" not in read_passwd(registry.passwd_path)
    assert "kiosk-a" in read_passwd(registry.passwd_path), "other entries are kept"
    secure_broker.server.reload()
    probe = Probe(
        secure_broker.server.port, "kiosk-new", enrolment.password, ca_file=secure_broker.ca.cert
    )
    with probe as device:
        assert device.connack is not None
        assert device.connack.is_failure


@pytest.mark.parametrize("device_id", ["bridge", "pipeline", "bad/id", "", "x" * 65])
def test_reserved_and_invalid_ids_are_refused(tmp_path: Path, device_id: str) -> None:
    """Service account names and ids outside the contract's rule are never enrolled."""
    with pytest.raises(ProvisionError):
        Registry(tmp_path).enrol([device_id], broker_url="mqtts://h:8883")
    assert not (tmp_path / "passwd").exists()


def test_cli_enrols_a_numbered_fleet_with_a_dev_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`provision devices --count` writes one config and client cert per device."""
    argv = [
        *("provision", "--registry", str(tmp_path), "devices", "--count", "3"),
        *("--prefix", "kiosk-", "--broker", "mqtts://b:8883", "--dev-ca", "--client-certs"),
    ]
    assert main(argv) == 0
    assert sorted(read_passwd(tmp_path / "passwd")) == ["kiosk-0001", "kiosk-0002", "kiosk-0003"]
    assert (tmp_path / "devices/kiosk-0003/client.crt").exists()
    assert "enrolled 3 devices" in capsys.readouterr().out
    assert main(["provision", "--registry", str(tmp_path), "revoke", "nobody"]) == 1
