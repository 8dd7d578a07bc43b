"""Enrol and revoke devices: Mosquitto credentials, client certificates, agent configs.

A registry directory holds everything the operator ships::

    registry/
      passwd                  Mosquitto password file (mount it; SIGHUP reloads it)
      ca/ca.crt, ca/ca.key    the dev CA, when --dev-ca made one
      devices/<id>/agent.toml the device's settings, credentials included (mode 0600)
      devices/<id>/ca.crt     the CA the agent trusts
      devices/<id>/client.crt, client.key   with --client-certs

Copy ``devices/<id>/`` to the device's install directory (``/etc/edge-agent``).
"""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from servicekit.urls import MqttUrl

from .passwd import hash_password, read_passwd, write_passwd
from .pki import CertFiles, create_ca, issue_cert

DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Service accounts named in mosquitto/acl; a device with such a name would get their rights.
RESERVED_NAMES = frozenset({"bridge", "pipeline"})
DEFAULT_INSTALL_DIR = Path("/etc/edge-agent")


class ProvisionError(Exception):
    """A device id is invalid or reserved, or the registry is inconsistent."""


@dataclass(frozen=True)
class Enrolment:
    """What was written for one device."""

    device_id: str
    directory: Path
    password: str


class Registry:
    """One registry directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.passwd_path = root / "passwd"
        self.ca_dir = root / "ca"
        self.devices_dir = root / "devices"

    def dev_ca(self) -> CertFiles:
        """The registry's dev CA, created on first use."""
        files = CertFiles(self.ca_dir / "ca.crt", self.ca_dir / "ca.key")
        return files if files.cert.exists() else create_ca(self.ca_dir)

    def enrol(
        self,
        device_ids: Iterable[str],
        *,
        broker_url: str,
        ca: CertFiles | None = None,
        client_certs: bool = False,
        install_dir: Path = DEFAULT_INSTALL_DIR,
    ) -> list[Enrolment]:
        """Create credentials (new passwords, also for re-enrolled devices) and configs.

        Raises:
            ProvisionError: an id breaks the device_id rule or is reserved, or
                client certificates were asked for without a CA with its key.
        """
        broker = MqttUrl.parse(broker_url)
        ids = list(device_ids)
        for device_id in ids:
            _check_device_id(device_id)
        if client_certs and (ca is None or not ca.key.exists()):
            raise ProvisionError("--client-certs needs a CA with its key (--dev-ca)")
        entries = read_passwd(self.passwd_path)
        enrolled = []
        for device_id in ids:
            password = secrets.token_urlsafe(24)
            entries[device_id] = hash_password(password)
            enrolled.append(
                self._write_device(
                    device_id, password, broker=broker, ca=ca, client_certs=client_certs,
                    install_dir=install_dir,
                )
            )  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        write_passwd(self.passwd_path, entries)
        return enrolled

    def add_service(self, name: str) -> str:
        """Create (or reset) a service account's password and return it."""
        if name not in RESERVED_NAMES:
            raise ProvisionError(f"service accounts are {sorted(RESERVED_NAMES)}, not {name!r}")
        entries = read_passwd(self.passwd_path)
        password = secrets.token_urlsafe(24)
        entries[name] = hash_password(password)
        self.root.mkdir(parents=True, exist_ok=True)
        write_passwd(self.passwd_path, entries)
        return password

    def revoke(self, device_ids: Iterable[str]) -> list[str]:
        """Remove devices' credentials and files; return the ids that were enrolled."""
        entries = read_passwd(self.passwd_path)
        revoked = [device_id for device_id in device_ids if entries.pop(device_id, None)]
        write_passwd(self.passwd_path, entries)
        for device_id in revoked:
            shutil.rmtree(self.devices_dir / device_id, ignore_errors=True)
        return revoked

    def _write_device(
        self,
        device_id: str,
        password: str,
        *,
        broker: MqttUrl,
        ca: CertFiles | None,
        client_certs: bool,
        install_dir: Path,
    ) -> Enrolment:
        directory = self.devices_dir / device_id
        directory.mkdir(parents=True, exist_ok=True)
        scheme = "mqtts" if broker.tls else "mqtt"
        url = (
            f"{scheme}://{quote(device_id)}:{quote(password, safe='')}@{broker.host}:{broker.port}"
        )
        lines = [
            f"# edge-agent settings for {device_id}; keep this file secret (it holds the password)",
            f'device_id = "{device_id}"',
            f'mqtt_url = "{url}"',
            'db = "/var/lib/edge-agent/outbox.db"',
        ]
        if ca is not None:
            shutil.copyfile(ca.cert, directory / "ca.crt")
            lines.append(f'ca_file = "{install_dir / "ca.crt"}"')
        if client_certs and ca is not None:
            files = issue_cert(ca, directory, device_id, server=False)
            files.cert.replace(directory / "client.crt")
            files.key.replace(directory / "client.key")
            lines.append(f'cert_file = "{install_dir / "client.crt"}"')
            lines.append(f'key_file = "{install_dir / "client.key"}"')
        config = directory / "agent.toml"
        config.touch(mode=0o600)
        config.write_text("\n".join(lines) + "\n")
        return Enrolment(device_id, directory, password)


def _check_device_id(device_id: str) -> None:
    if not DEVICE_ID.match(device_id):
        raise ProvisionError(f"invalid device id {device_id!r}: 1-64 of [A-Za-z0-9_.-]")
    if device_id in RESERVED_NAMES:
        raise ProvisionError(f"{device_id!r} is a service account name")
