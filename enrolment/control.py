"""Live changes to a running broker through the dynamic-security control API.

The ``admin`` account publishes ``{"commands": [...]}`` to
``$CONTROL/dynamic-security/v1``; the plugin applies each command at once,
saves its whole state to its accounts file, and answers every command on
``…/v1/response`` with the same ``correlationData`` and an ``error`` string if
it failed. No broker restart, no other client disturbed.

What Mosquitto 2.0.11 does (plugins/dynamic-security/clients.c, tested in
tests/enrolment/test_live_enrolment.py): ``deleteClient`` and
``setClientPassword`` disconnect the account's live session at once, so a
revocation or a password rotation takes effect within the command's round trip.
2.0 has no ``kickClient`` command; those two are the kick.

Errors: :class:`ControlError` (a :class:`~enrolment.provision.ProvisionError`)
carries the command and the plugin's error string; connecting or a missing
answer raise it too, with ``command`` set to ``connect`` or the command.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from servicekit.urls import MqttUrl

from .dynsec import (
    ADMIN_ACCOUNT,
    CONTROL_RESPONSE_TOPIC,
    CONTROL_TOPIC,
    DEVICE_ROLE_PREFIX,
    Role,
    device_client_id,
    device_role,
    service_roles,
)
from .provision import ProvisionError

TIMEOUT_S: Final = (
    30.0  # the plugin rewrites its whole file per command: seconds at 10,000 accounts
)
EXISTS: Final = ("Client already exists", "Role already exists")
NOT_FOUND: Final = ("Client not found", "Role not found")
SESSION_CLOSED: Final = "the broker closed the session before it answered"

Command = Mapping[str, object]


class ControlError(ProvisionError):
    """The broker refused a command, or could not be reached or did not answer."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"broker control: {command}: {error}")
        self.command = command
        self.error = error


class Response(msgspec.Struct, frozen=True):
    """The plugin's answer to one command; ``error`` None means done."""

    command: str
    correlation: str = msgspec.field(default="", name="correlationData")
    error: str | None = None


class _Responses(msgspec.Struct, frozen=True):
    responses: tuple[Response, ...] = ()


_decode = msgspec.json.Decoder(_Responses).decode


class Control:
    """One admin session on the broker's control topic (a context manager, not re-entrant)."""

    def __init__(
        self,
        url: MqttUrl,
        password: str,
        *,
        ca_file: Path | None = None,
        username: str = ADMIN_ACCOUNT,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.url = url
        self.username = username
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self._gone = False
        self._answers: dict[str, Response] = {}
        self._lock = threading.Condition()
        self._connack: ReasonCode | None = None
        self._suback: list[ReasonCode] = []
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"order-enrol-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        self._client.username_pw_set(username, password)
        context = url.ssl_context(str(ca_file) if ca_file else "")
        if context is not None:
            self._client.tls_set_context(context)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def __enter__(self) -> Self:
        try:
            self._client.connect(self.url.host, self.url.port)
        except OSError as exc:
            raise ControlError("connect", f"{self.url}: {exc}") from exc
        self._client.loop_start()
        try:
            self._handshake()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def run(self, commands: Sequence[Command]) -> list[Response]:
        """Send ``commands`` in one message; return the answers in the same order.

        Raises:
            ControlError: the broker did not answer every command in time, or
                closed the session first (:data:`SESSION_CLOSED`).
        """
        ids = [secrets.token_hex(8) for _ in commands]
        body = [
            {**command, "correlationData": cid} for command, cid in zip(commands, ids, strict=True)
        ]
        self._client.publish(CONTROL_TOPIC, msgspec.json.encode({"commands": body}), qos=1)
        with self._lock:
            self._lock.wait_for(
                lambda: self._gone or all(i in self._answers for i in ids), self.timeout_s
            )
            if not all(i in self._answers for i in ids):
                error = SESSION_CLOSED if self._gone else "no answer from the broker"
                raise ControlError(str(commands[0].get("command")), error)
            return [self._answers.pop(i) for i in ids]

    def _handshake(self) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self._connack is not None, self.timeout_s):
                raise ControlError("connect", f"{self.url}: no CONNACK")
            if self._connack is not None and self._connack.is_failure:
                raise ControlError("connect", f"{self.url}: {self._connack}")
        self._client.subscribe(CONTROL_RESPONSE_TOPIC, qos=1)
        with self._lock:
            if not self._lock.wait_for(lambda: bool(self._suback), self.timeout_s):
                raise ControlError("subscribe", "no SUBACK")
            if self._suback[0].is_failure:
                raise ControlError("subscribe", f"{CONTROL_RESPONSE_TOPIC}: {self._suback[0]}")

    def _close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None
    ) -> None:
        with self._lock:
            self._connack = rc
            self._lock.notify_all()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, _rc: ReasonCode, _p: Properties | None
    ) -> None:
        with self._lock:
            self._gone = True
            self._lock.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _m: int, rcs: list[ReasonCode], _p: Properties | None
    ) -> None:
        with self._lock:
            self._suback.extend(rcs)
            self._lock.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            answers = _decode(msg.payload).responses
        except msgspec.DecodeError:
            return  # not an answer to anyone; the waiting command times out if it was ours
        with self._lock:
            self._answers.update((a.correlation, a) for a in answers if a.correlation)
            self._lock.notify_all()


def _role_command(role: Role) -> Command:
    acls = [msgspec.structs.asdict(acl) for acl in role.acls]
    return {"command": "createRole", "rolename": role.rolename, "acls": acls}


def _check(responses: Iterable[Response], tolerated: Sequence[str] = ()) -> list[Response]:
    answers = list(responses)
    for answer in answers:
        if answer.error is not None and answer.error not in tolerated:
            raise ControlError(answer.command, answer.error)
    return answers


def set_account(
    control: Control, username: str, password: str, role: Role, *, clientid: str | None
) -> bool:
    """Create the account and its role, or give an existing one ``password``; True if new.

    An existing account's live session ends (the plugin's rule on a new
    password); its role is left as it is (``order-enrol rights`` is offline).
    That includes the admin session itself when it resets its own password:
    the plugin closes it before the answer leaves, so a new session with the
    new password is the proof.
    """
    client: dict[str, object] = {
        "command": "createClient",
        "username": username,
        "password": password,
        "roles": [{"rolename": role.rolename}],
    }
    if clientid is not None:
        client["clientid"] = clientid
    _, created = _check(control.run([_role_command(role), client]), EXISTS)
    if created.error is None:
        return True
    rotate = {"command": "setClientPassword", "username": username, "password": password}
    try:
        _check(control.run([rotate]))
    except ControlError as exc:
        if username != control.username or exc.error != SESSION_CLOSED:
            raise
        with Control(control.url, password, ca_file=control.ca_file, username=username):
            pass
    return False


def enrol_device(control: Control, device_id: str, password: str) -> bool:
    """Live enrolment (or password rotation) of one device; True if it is new."""
    role = device_role(device_id)
    return set_account(control, device_id, password, role, clientid=device_client_id(device_id))


def set_service(control: Control, name: str, password: str) -> bool:
    """Live creation or password reset of a service account; True if it is new."""
    return set_account(control, name, password, service_roles()[name], clientid=None)


def revoke_device(control: Control, device_id: str) -> bool:
    """Delete a device's account (ending its session) and role; False if it had none."""
    deleted, _ = _check(
        control.run([
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": f"{DEVICE_ROLE_PREFIX}{device_id}"},
        ]),
        NOT_FOUND,
    )  # fmt: skip
    return deleted.error is None
