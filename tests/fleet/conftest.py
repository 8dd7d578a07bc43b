"""Fixtures for the fleet tests: a broker running the production config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.passwd import hash_password, write_passwd
from fleet.pki import CertFiles, create_ca, issue_cert
from fleet.servers import MosquittoProcess, free_port

from .mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {"kiosk-a": "pw-a", "kiosk-b": "pw-b", "bridge": "pw-bridge"}


@dataclass(frozen=True)
class SecureBroker:
    """A running broker with the production config, and the CA its clients trust."""

    server: MosquittoProcess
    ca: CertFiles
    conf_dir: Path


def secure_config(directory: Path, port: int) -> str:
    """The committed secure.conf with its paths and port pointed at ``directory``."""
    text = (REPO / "mosquitto/secure.conf").read_text()
    for mounted in ("/mosquitto/config/", "/mosquitto/certs/", "/mosquitto/data/"):
        text = text.replace(mounted, f"{directory}/")
    return text.replace("listener 8883", f"listener {port} 127.0.0.1")


@pytest.fixture
def secure_broker(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> SecureBroker:
    """Mosquitto with TLS, passwords and the ACL, certificates made for this test."""
    conf_dir = tmp_path / "conf"
    ca = create_ca(conf_dir)
    server_cert = issue_cert(ca, conf_dir, "localhost", server=True)
    server_cert.cert.rename(conf_dir / "server.crt")
    server_cert.key.rename(conf_dir / "server.key")
    (conf_dir / "acl").write_text((REPO / "mosquitto/acl").read_text())
    write_passwd(conf_dir / "passwd", {u: hash_password(p) for u, p in PASSWORDS.items()})
    port = free_port()
    return SecureBroker(
        mosquitto_factory(port=port, config=secure_config(conf_dir, port)), ca, conf_dir
    )


def probe(broker: SecureBroker, user: str | None, password: str | None = None) -> Probe:
    """A TLS client trusting the broker's CA."""
    return Probe(broker.server.port, user, password, ca_file=broker.ca.cert)
