"""`order-enrol check`: what is wrong with a registry, file by file.

Checks modes (secrets readable by their owner only, nothing in the registry,
its root included, writable by group or others), stray files, folders without
an account, accounts without a folder, and device accounts whose
rights or client-id binding differ from :func:`enrolment.dynsec.device_role`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from .dynsec import (
    DEVICE_ROLE_PREFIX,
    SERVICE_ACCOUNTS,
    Accounts,
    RoleRef,
    device_client_id,
    device_role,
    service_roles,
)
from .files import file_mode
from .provision import ProvisionError, Registry, check_device_id

# Bits a secret must not have: group write and anything for others. 0640 is
# allowed so that a root-owned file can be given to the broker's group.
SECRET_FORBIDDEN = 0o037
PUBLIC_FORBIDDEN = 0o022  # certificates: readable by all, writable by the owner only
WRITABLE_BY_OTHERS = 0o022  # on any path: another user could replace what it holds
DEVICE_FILES = {"agent.toml": SECRET_FORBIDDEN, "client.key": 0o077}
DEVICE_PUBLIC = {"ca.crt", "client.crt"}


@dataclass(frozen=True)
class Finding:
    """One problem: where, and what."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def audit(registry: Registry) -> list[Finding]:
    """Every problem in ``registry``; an empty list means it is consistent."""
    findings: list[Finding] = []
    accounts = _accounts(registry, findings)
    _check_mode(registry.ca_dir / "ca.key", 0o077, findings)
    folders = _device_folders(registry, findings)
    enrolled = accounts.devices() if accounts else set()
    for device_id in sorted(folders - enrolled):
        findings.append(Finding(registry.devices_dir / device_id, "folder without an account"))
    for device_id in sorted(enrolled - folders):
        findings.append(Finding(registry.accounts_path, f"account {device_id!r} has no folder"))
    if accounts is not None:
        _check_rights(registry, accounts, findings)
    _check_writable(registry.root, findings)
    return findings


def _check_writable(root: Path, findings: list[Finding]) -> None:
    """Any path under ``root`` (and ``root``) that group or others may write.

    A writable folder is as bad as a writable file: whoever can write it can
    rename a file away and put their own in its place. Paths already reported
    are not reported twice.
    """
    if not root.is_dir():
        return
    reported = {finding.path for finding in findings}
    paths = [root]
    for folder, dirs, files in os.walk(root):
        paths += [Path(folder) / name for name in (*dirs, *files)]
    for path in paths:
        if path in reported or path.is_symlink():  # a symlink's own mode means nothing
            continue
        mode = file_mode(path)
        if mode & WRITABLE_BY_OTHERS:
            findings.append(Finding(path, f"mode {mode:04o} is writable by group or others"))


def _accounts(registry: Registry, findings: list[Finding]) -> Accounts | None:
    path = registry.accounts_path
    if not path.exists():
        findings.append(Finding(path, "missing"))
        return None
    _check_mode(path, SECRET_FORBIDDEN, findings)
    try:
        return Accounts.load(path)
    except msgspec.DecodeError as exc:
        findings.append(Finding(path, f"unreadable: {exc}"))
        return None


def _device_folders(registry: Registry, findings: list[Finding]) -> set[str]:
    if not registry.devices_dir.is_dir():
        return set()
    folders = set()
    for entry in sorted(registry.devices_dir.iterdir()):
        try:
            check_device_id(entry.name)
        except ProvisionError as exc:
            findings.append(Finding(entry, f"not a device folder: {exc}"))
            continue
        if entry.is_symlink() or not entry.is_dir():
            findings.append(Finding(entry, "not a folder"))
            continue
        folders.add(entry.name)
        _check_mode(entry, 0o077, findings)
        for name in sorted(p.name for p in entry.iterdir()):
            path = entry / name
            if name in DEVICE_FILES:
                _check_mode(path, DEVICE_FILES[name], findings)
            elif name in DEVICE_PUBLIC:
                _check_mode(path, PUBLIC_FORBIDDEN, findings)
            else:
                findings.append(Finding(path, "unexpected file"))
        if not (entry / "agent.toml").exists():
            findings.append(Finding(entry / "agent.toml", "missing"))
    return folders


def _check_rights(registry: Registry, accounts: Accounts, findings: list[Finding]) -> None:
    where = registry.accounts_path
    for name, client in sorted(accounts.clients.items()):
        if name in SERVICE_ACCOUNTS:
            if client.roles != (RoleRef(name),):
                findings.append(Finding(where, f"service {name!r} holds roles {client.roles}"))
            if accounts.roles.get(name) != service_roles()[name]:
                findings.append(Finding(where, f"service {name!r} rights differ from the policy"))
            continue
        try:
            check_device_id(name)
        except ProvisionError as exc:
            findings.append(Finding(where, f"account {name!r}: {exc}"))
            continue
        if client.clientid != device_client_id(name):
            findings.append(Finding(where, f"device {name!r} is not bound to its client id"))
        role = device_role(name)
        if client.roles != (RoleRef(role.rolename),) or accounts.roles.get(role.rolename) != role:
            findings.append(Finding(where, f"device {name!r} rights differ from the policy"))
    for rolename in sorted(accounts.roles):
        owner = rolename.removeprefix(DEVICE_ROLE_PREFIX)
        if rolename.startswith(DEVICE_ROLE_PREFIX) and owner not in accounts.clients:
            findings.append(Finding(where, f"role {rolename!r} has no account"))


def _check_mode(path: Path, forbidden: int, findings: list[Finding]) -> None:
    if not path.exists():
        return
    if path.is_symlink():
        findings.append(Finding(path, "is a symlink"))
        return
    mode = file_mode(path)
    if mode & forbidden:
        findings.append(Finding(path, f"mode {mode:04o} (must not have {forbidden:04o})"))
