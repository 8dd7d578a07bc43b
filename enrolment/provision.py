"""Enrol and revoke devices: broker accounts, client certificates, agent configs.

A registry directory holds everything the operator ships::

    registry/
      dynamic-security.json   broker accounts and rights (0600; the broker reads it at start)
      ca/ca.crt, ca/ca.key    the dev CA, when --dev-ca made one (key 0600, folder 0700)
      devices/<id>/           one folder per device (0700):
        agent.toml            the device's settings, password included (0600)
        ca.crt                the CA the agent trusts (0644)
        client.crt, client.key  with --client-certs (0644, 0600)

Copy ``devices/<id>/`` to the device's install directory (``/etc/edge-agent``).
Nothing is ever written or deleted outside ``devices/<id>/`` for a valid id
(plus the accounts file and the CA folder): ids must fully match the
contract's device id rule and may not be ``.`` or ``..``.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

import msgspec

from schemas.ids import is_device_id
from servicekit.urls import MqttUrl

from .dynsec import SERVICE_ACCOUNTS, Accounts, device_client_id
from .files import PRIVATE_DIR_MODE, PUBLIC_MODE, SECRET_MODE, make_dir, write_file
from .pki import CertFiles, create_ca, issue_cert

# Service accounts plus names an operator would read as one; compared casefolded.
RESERVED_NAMES: Final = frozenset({*SERVICE_ACCOUNTS, "admin", "default"})
DEFAULT_INSTALL_DIR: Final = Path("/etc/edge-agent")
ACCOUNTS_FILE: Final = "dynamic-security.json"


class ProvisionError(Exception):
    """A device id is invalid or reserved, or the registry is inconsistent."""


@dataclass(frozen=True)
class Enrolment:
    """What was written for one device."""

    device_id: str
    directory: Path
    password: str


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it may name a device and a folder, else raise.

    Raises:
        ProvisionError: the id breaks the contract's rule (whole-string match:
            no newline, separator or other character outside ``[A-Za-z0-9_.-]``),
            is ``.`` or ``..``, or is a reserved service name in any letter case.
    """
    if not is_device_id(device_id):
        raise ProvisionError(f"invalid device id {device_id!r}: 1-64 of [A-Za-z0-9_.-]")
    if device_id in {".", ".."}:
        raise ProvisionError(f"invalid device id {device_id!r}: a path, not a name")
    if device_id.casefold() in RESERVED_NAMES:
        raise ProvisionError(f"{device_id!r} is reserved for a service account")
    return device_id


class Registry:
    """One registry directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.accounts_path = root / ACCOUNTS_FILE
        self.ca_dir = root / "ca"
        self.devices_dir = root / "devices"

    def dev_ca(self) -> CertFiles:
        """The registry's dev CA, created on first use."""
        files = CertFiles(self.ca_dir / "ca.crt", self.ca_dir / "ca.key")
        if files.cert.exists():
            return files
        make_dir(self.ca_dir, PRIVATE_DIR_MODE)
        return create_ca(self.ca_dir)

    def device_dir(self, device_id: str) -> Path:
        """``devices/<id>`` for a checked id; never anything else."""
        directory = self.devices_dir / check_device_id(device_id)
        if directory.parent != self.devices_dir:  # belt and braces over the id rule
            raise ProvisionError(f"{device_id!r} does not name a folder in {self.devices_dir}")
        return directory

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
            ProvisionError: an id is invalid or reserved (nothing is written
                then), or client certificates were asked for without a CA key.
        """
        broker = MqttUrl.parse(broker_url)
        ids = list(device_ids)
        directories = [self.device_dir(device_id) for device_id in ids]
        if client_certs and (ca is None or not ca.key.exists()):
            raise ProvisionError("--client-certs needs a CA with its key (--dev-ca)")
        accounts = self._accounts()
        enrolled = []
        make_dir(self.devices_dir, 0o755)
        for device_id, directory in zip(ids, directories, strict=True):
            password = secrets.token_urlsafe(24)
            accounts.set_device(device_id, password)
            self._write_device(
                device_id, directory, password, broker=broker, ca=ca,
                client_certs=client_certs, install_dir=install_dir,
            )  # fmt: skip
            enrolled.append(Enrolment(device_id, directory, password))
        accounts.save(self.accounts_path)
        return enrolled

    def add_service(self, name: str) -> str:
        """Create (or reset) a service account's password and return it."""
        if name not in SERVICE_ACCOUNTS:
            raise ProvisionError(f"service accounts are {list(SERVICE_ACCOUNTS)}, not {name!r}")
        accounts = self._accounts()
        password = secrets.token_urlsafe(24)
        accounts.set_service(name, password)
        self.root.mkdir(parents=True, exist_ok=True)
        accounts.save(self.accounts_path)
        return password

    def revoke(self, device_ids: Iterable[str]) -> list[str]:
        """Remove devices' accounts and folders; return the ids that were enrolled.

        Raises:
            ProvisionError: an id is invalid or reserved; nothing is removed then.
        """
        directories = {device_id: self.device_dir(device_id) for device_id in device_ids}
        accounts = self._accounts()
        revoked = [device_id for device_id in directories if accounts.remove_device(device_id)]
        if revoked:
            accounts.save(self.accounts_path)
        for device_id in revoked:
            directory = directories[device_id]
            if directory.is_dir() and not directory.is_symlink():
                shutil.rmtree(directory)
        return revoked

    def refresh_rights(self) -> int:
        """Rewrite every account's rights to the committed policy; return the accounts.

        Passwords and client ids stay; run it after an upgrade that adds rights
        (device commands), then restart the broker.
        """
        accounts = self._accounts()
        accounts.save(self.accounts_path)
        return len(accounts.clients)

    def _accounts(self) -> Accounts:
        try:
            return Accounts.load(self.accounts_path)
        except msgspec.DecodeError as exc:
            raise ProvisionError(f"{self.accounts_path} is not an accounts file: {exc}") from exc

    def _write_device(
        self,
        device_id: str,
        directory: Path,
        password: str,
        *,
        broker: MqttUrl,
        ca: CertFiles | None,
        client_certs: bool,
        install_dir: Path,
    ) -> None:
        make_dir(directory, PRIVATE_DIR_MODE)
        scheme = "mqtts" if broker.tls else "mqtt"
        url = (
            f"{scheme}://{quote(device_id)}:{quote(password, safe='')}@{broker.host}:{broker.port}"
        )
        lines = [
            f"# edge-agent settings for {device_id}; keep this file secret (it holds the password)",
            f'device_id = "{device_id}"',
            f'mqtt_url = "{url}"',
            "# The broker binds this account to this client id.",
            f'client_id = "{device_client_id(device_id)}"',
            'db = "/var/lib/edge-agent/outbox.db"',
        ]
        if ca is not None:
            write_file(directory / "ca.crt", ca.cert.read_bytes(), PUBLIC_MODE)
            lines.append(f'ca_file = "{install_dir / "ca.crt"}"')
        if client_certs and ca is not None:
            files = issue_cert(ca, directory, device_id, server=False)
            files.cert.replace(directory / "client.crt")
            files.key.replace(directory / "client.key")
            lines.append(f'cert_file = "{install_dir / "client.crt"}"')
            lines.append(f'key_file = "{install_dir / "client.key"}"')
        write_file(directory / "agent.toml", ("\n".join(lines) + "\n").encode(), SECRET_MODE)
