"""The broker's accounts and rights: the file of Mosquitto's dynamic-security plugin.

``mosquitto/secure.conf`` loads ``mosquitto_dynamic_security.so`` with this
file; ``order-enrol`` writes it. Why this plugin rather than
``password_file`` + ``acl_file`` (measured on Mosquitto 2.0.11 by
tests/enrolment/test_secure_broker.py and described in docs/explanation/security.md):

- ``acl_file`` never checks SUBSCRIBE in 2.0: any device may join
  ``$share/bridge/v1/devices/+/orders``, take its share of every device's
  orders, and have them dropped at delivery. The plugin checks every SUBSCRIBE
  against the whole filter, ``$share/{group}/`` included, and denies by default.
- ``use_username_as_clientid`` binds client id to username for every account,
  so bridge replicas sharing the ``bridge`` account would share one client id
  and kick each other out. The plugin binds a client id per account: each
  device to ``edge-{device_id}``, services stay free to name their replicas.
- The plugin in 2.0 has no ``%u`` in ACL topics, so each device has its own role.
- The plugin reads this file only at start (SIGHUP does not reload it,
  measured on 2.0.11). A running broker is changed live through its control
  topic instead (``enrolment.control``, ``order-enrol … --live``), and the
  plugin then saves its whole state back to this file after every command:
  while the broker runs, the file is the broker's, and only ``--live`` changes
  it. Writing it offline is for a stopped broker (bootstrap).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Literal

import msgspec

from schemas.names import (
    FLEET_COMMAND_TOPIC,
    TOPIC_PREFIX,
    command_topic,
    orders_topic,
    receipts_topic,
    status_query_topic,
    status_topic,
)

from .files import SECRET_MODE, write_file

# Service accounts and their rights. A device may not be named like one of
# these in any letter case (`provision` refuses it).
SERVICE_ACCOUNTS: Final = ("bridge", "pipeline", "admin")
ADMIN_ACCOUNT: Final = "admin"
# The plugin's control API (Mosquitto 2.0): commands in, responses out.
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
CONTROL_RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
ITERATIONS: Final = 101  # the plugin's default; passwords are 192 random bits
SALT_BYTES: Final = 12
DEVICE_ROLE_PREFIX: Final = "device:"

# The rule types in the order the plugin keeps a role's rules in (by type, then by
# priority, highest first) and saves them in after a live change; policies are written in
# it so that a role the broker saved compares equal to the policy (`order-enrol check`).
AclType = Literal[
    "publishClientSend",
    "publishClientReceive",
    "subscribeLiteral",
    "subscribePattern",
    "unsubscribeLiteral",
    "unsubscribePattern",
]
ACL_ORDER: Final[tuple[AclType, ...]] = typing.get_args(AclType)


class Acl(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One rule of a role; ``allow`` false denies."""

    acltype: AclType
    topic: str
    allow: bool = True
    priority: int = 0


# The plugin crashes (2.0.11, SIGSEGV at start) on `"textName": null`, so
# optional strings are left out; `allow` is always written (missing means deny).
class Role(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A named set of rules."""

    rolename: str
    acls: tuple[Acl, ...] = ()
    textname: str | None = msgspec.field(default=None, name="textName")


def canonical(role: Role) -> Role:
    """``role`` with its rules in the plugin's order (stable within a type and priority)."""
    acls = sorted(role.acls, key=lambda acl: (ACL_ORDER.index(acl.acltype), -acl.priority))
    return msgspec.structs.replace(role, acls=tuple(acls))


class RoleRef(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A role held by a client."""

    rolename: str
    priority: int = -1


class Client(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """An account: PBKDF2-SHA512 hash, the client id it must use (if bound), its roles."""

    username: str
    password: str
    salt: str
    iterations: int
    roles: tuple[RoleRef, ...] = ()
    clientid: str | None = None
    textname: str | None = msgspec.field(default=None, name="textName")
    disabled: bool = False


class DefaultAccess(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a client may do that no rule of its roles names."""

    publish_send: bool = msgspec.field(default=False, name="publishClientSend")
    publish_receive: bool = msgspec.field(default=False, name="publishClientReceive")
    subscribe: bool = False
    unsubscribe: bool = True


class DynsecFile(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The whole file."""

    clients: tuple[Client, ...] = ()
    groups: tuple[msgspec.Raw, ...] = ()
    roles: tuple[Role, ...] = ()
    default_access: DefaultAccess = msgspec.field(
        default_factory=DefaultAccess, name="defaultACLAccess"
    )


def service_roles() -> dict[str, Role]:
    """The service accounts' rights: exactly the topics they use."""
    every = f"{TOPIC_PREFIX}+"
    roles = {
        "bridge": Role(
            "bridge",
            (
                Acl("subscribePattern", f"$share/+/{every}/orders"),
                Acl("publishClientReceive", f"{every}/orders"),
                Acl("publishClientSend", f"{every}/receipts"),
            ),
        ),
        "pipeline": Role(
            "pipeline",
            (
                Acl("subscribePattern", f"$share/+/{every}/status-query"),
                Acl("publishClientReceive", f"{every}/status-query"),
                Acl("publishClientSend", f"{every}/status"),
                # Device health and MQTT Wills (offline detection).
                Acl("subscribePattern", f"$share/+/{every}/health"),
                Acl("publishClientReceive", f"{every}/health"),
                # Device commands (`order-pipeline devices retry-held`): only this account.
                Acl("publishClientSend", f"{every}/cmd"),
                Acl("publishClientSend", FLEET_COMMAND_TOPIC),
            ),
        ),
        # `order-enrol … --live`: accounts and rights, nothing else.
        ADMIN_ACCOUNT: Role(
            ADMIN_ACCOUNT,
            (
                Acl("publishClientSend", CONTROL_TOPIC),
                Acl("subscribeLiteral", CONTROL_RESPONSE_TOPIC),
                Acl("publishClientReceive", CONTROL_RESPONSE_TOPIC),
            ),
        ),
    }
    return {name: canonical(role) for name, role in roles.items()}


def health_topic(device_id: str) -> str:
    """``v1/devices/{device_id}/health``: device → cloud (health, MQTT Will)."""
    return f"{TOPIC_PREFIX}{device_id}/health"


def device_client_id(device_id: str) -> str:
    """The only client id a device's account may connect with (the agent's default)."""
    return f"edge-{device_id}"


def device_role(device_id: str) -> Role:
    """A device's rights: its own topics only, no wildcard beyond its subtree, no $share.

    It hears commands on its own ``cmd`` topic and on the fleet's, and may
    publish to neither (no rule allows it, and the default denies).
    """
    role = Role(
        f"{DEVICE_ROLE_PREFIX}{device_id}",
        (
            Acl("publishClientSend", orders_topic(device_id)),
            Acl("publishClientSend", status_query_topic(device_id)),
            Acl("publishClientSend", health_topic(device_id)),
            Acl("subscribePattern", f"{TOPIC_PREFIX}{device_id}/#"),
            Acl("publishClientReceive", receipts_topic(device_id)),
            Acl("publishClientReceive", status_topic(device_id)),
            Acl("publishClientReceive", command_topic(device_id)),
            Acl("subscribeLiteral", FLEET_COMMAND_TOPIC),
            Acl("publishClientReceive", FLEET_COMMAND_TOPIC),
        ),
    )
    return canonical(role)


def hash_password(password: str, *, salt: bytes | None = None) -> tuple[str, str]:
    """``(hash, salt)`` as the plugin stores them (base64 PBKDF2-SHA512, 64 bytes)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return base64.b64encode(digest).decode(), base64.b64encode(salt).decode()


def verify_password(client: Client, password: str) -> bool:
    """True when ``password`` is ``client``'s (tests, `provision check`)."""
    salt = base64.b64decode(client.salt)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, client.iterations)
    return secrets.compare_digest(base64.b64encode(digest).decode(), client.password)


def make_client(username: str, password: str, *, device: bool) -> Client:
    """A device account (bound client id, its own role) or a service account."""
    hashed, salt = hash_password(password)
    if device:
        role = f"{DEVICE_ROLE_PREFIX}{username}"
        return Client(
            username, hashed, salt, ITERATIONS, (RoleRef(role),), device_client_id(username)
        )
    return Client(username, hashed, salt, ITERATIONS, (RoleRef(username),))


class Accounts:
    """The accounts in one file, edited in memory and written back whole."""

    def __init__(self, clients: Iterable[Client] = (), roles: Iterable[Role] = ()) -> None:
        self.clients = {client.username: client for client in clients}
        self.roles = {role.rolename: role for role in roles}

    @classmethod
    def load(cls, path: Path) -> Accounts:
        """Read ``path`` (missing: no accounts)."""
        if not path.exists():
            return cls()
        data = msgspec.json.decode(path.read_bytes(), type=DynsecFile)
        # Files written before the policy followed the plugin's order compare by content.
        return cls(data.clients, map(canonical, data.roles))

    def set_device(self, device_id: str, password: str) -> None:
        """Add or reset a device account and its role."""
        self.clients[device_id] = make_client(device_id, password, device=True)
        role = device_role(device_id)
        self.roles[role.rolename] = role

    def set_service(self, name: str, password: str) -> None:
        """Add or reset a service account; its role is the committed one."""
        self.clients[name] = make_client(name, password, device=False)

    def remove_device(self, device_id: str) -> bool:
        """Remove a device account and its role; False when it was not there."""
        self.roles.pop(f"{DEVICE_ROLE_PREFIX}{device_id}", None)
        return self.clients.pop(device_id, None) is not None

    def devices(self) -> set[str]:
        """Usernames of device accounts."""
        return {name for name in self.clients if name not in SERVICE_ACCOUNTS}

    def save(self, path: Path) -> None:
        """Write the file (0600: it holds password hashes) with the committed roles.

        Every service and device role is written as the policy here says, so
        any save brings the rights of accounts enrolled by an older release up
        to date (``order-enrol rights`` saves for just that).
        """
        devices = {role.rolename: role for role in map(device_role, self.devices())}
        roles = {**self.roles, **devices, **service_roles()}
        data = DynsecFile(
            clients=tuple(self.clients[name] for name in sorted(self.clients)),
            roles=tuple(roles[name] for name in sorted(roles)),
        )
        write_file(path, msgspec.json.format(msgspec.json.encode(data)), SECRET_MODE)
