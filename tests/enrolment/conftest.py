"""Fixtures for the enrolment tests: a broker running the production config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from enrolment.dynsec import Accounts, device_client_id
from enrolment.pki import CertFiles, create_ca, issue_cert
from testrig.servers import MosquittoProcess, free_port
from tests.tools import unavailable

from ..fleet.mqtt_probe import Probe

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "kiosk-a": "pw-a",
    "kiosk-b": "pw-b",
    "bridge": "pw-bridge",
    "pipeline": "pw-pipe",
    "admin": "pw-admin",
}
DEVICES = ("kiosk-a", "kiosk-b")
# Where distributions install the dynamic-security plugin (secure.conf names the image's).
DYNSEC_PLUGINS = (
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)


@dataclass(frozen=True)
class SecureBroker:
    """A running broker with the production config, and the CA its clients trust."""

    server: MosquittoProcess
    ca: CertFiles
    conf_dir: Path


def dynsec_plugin() -> str:
    """Path of the installed dynamic-security plugin (skips without one, fails under CI=true)."""
    plugin = next((p for p in DYNSEC_PLUGINS if Path(p).exists()), None)
    if plugin is None:
        unavailable("mosquitto_dynamic_security.so not found (the mosquitto package has it)")
    return plugin


def secure_config(directory: Path, port: int) -> str:
    """The committed secure.conf with its paths and port pointed at ``directory``."""
    text = (REPO / "mosquitto/secure.conf").read_text()
    text = text.replace(
        "plugin /usr/lib/mosquitto_dynamic_security.so", f"plugin {dynsec_plugin()}"
    )
    mounts = ("/mosquitto/config/", "/mosquitto/accounts/", "/mosquitto/certs/", "/mosquitto/data/")
    for mounted in mounts:
        text = text.replace(mounted, f"{directory}/")
    return text.replace("listener 8883", f"listener {port} 127.0.0.1")


@pytest.fixture
def secure_broker(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> SecureBroker:
    """Mosquitto with TLS, passwords and the ACL, certificates made for this test."""
    return start_secure_broker(tmp_path / "conf", mosquitto_factory, write_accounts)


def start_secure_broker(
    conf_dir: Path,
    mosquitto_factory: Callable[..., MosquittoProcess],
    accounts: Callable[[Path], None],
    extra_conf: str = "",
) -> SecureBroker:
    """Certificates, the accounts ``accounts(conf_dir)`` writes, and a broker on them.

    ``extra_conf`` is appended to the config (another listener, say).
    """
    ca = create_ca(conf_dir)
    server_cert = issue_cert(ca, conf_dir, "localhost", server=True)
    server_cert.cert.rename(conf_dir / "server.crt")
    server_cert.key.rename(conf_dir / "server.key")
    accounts(conf_dir)
    port = free_port()
    return SecureBroker(
        mosquitto_factory(port=port, config=secure_config(conf_dir, port) + extra_conf),
        ca,
        conf_dir,
    )


def write_accounts(conf_dir: Path, more_devices: int = 0) -> None:
    """The accounts file for :data:`PASSWORDS` (plus ``bulk-NNNNN`` devices, password "pw")."""
    accounts = Accounts()
    for i in range(more_devices):
        accounts.set_device(bulk_device(i), "pw")
    for user, password in PASSWORDS.items():
        if user in DEVICES:
            accounts.set_device(user, password)
        else:
            accounts.set_service(user, password)
    accounts.save(conf_dir / "dynamic-security.json")


def probe(
    broker: SecureBroker,
    user: str | None,
    password: str | None = None,
    client_id: str | None = None,
) -> Probe:
    """A TLS client trusting the broker's CA; a device uses its bound client id by default."""
    if client_id is None and user in DEVICES:
        client_id = device_client_id(user)
    return Probe(broker.server.port, user, password, ca_file=broker.ca.cert, client_id=client_id)


def bulk_device(i: int) -> str:
    """The id of the ``i``-th extra device :func:`write_accounts` enrols."""
    return f"bulk-{i:05d}"
