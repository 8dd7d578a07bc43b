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

import contextlib
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import msgspec

from servicekit.mqtt_varint import decode_varint, encode_varint
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
    """One admin session on the broker's control topic (a context manager, not re-entrant).

    A small blocking MQTT 5 client of its own (CONNECT, SUBSCRIBE, QoS 0
    PUBLISH both ways) rather than paho: ``order-enrol`` installs without a
    broker client (``pip install .[enrol]``), and one request at a time needs
    no background thread.
    """

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
        self._password = password
        self._sock: socket.socket | None = None
        self._answers: dict[str, Response] = {}

    def __enter__(self) -> Self:
        if self._sock is not None:
            raise RuntimeError("Control is not re-entrant")
        try:
            sock = socket.create_connection((self.url.host, self.url.port), self.timeout_s)
            context = self.url.ssl_context(str(self.ca_file) if self.ca_file else "")
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=self.url.host)
        except OSError as exc:
            raise ControlError("connect", f"{self.url}: {exc}") from exc
        self._sock = sock
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
        name = str(commands[0].get("command"))
        self._send(_publish(CONTROL_TOPIC, msgspec.json.encode({"commands": body})))
        deadline = time.monotonic() + self.timeout_s
        while not all(i in self._answers for i in ids):
            if time.monotonic() > deadline:
                raise ControlError(name, "no answer from the broker")
            try:
                packet_type, data = self._read(deadline)
            except (OSError, ConnectionError) as exc:
                raise ControlError(name, SESSION_CLOSED) from exc
            if packet_type == PUBLISH:
                self._take_answers(data)
            elif packet_type == DISCONNECT:
                raise ControlError(name, SESSION_CLOSED)
        return [self._answers.pop(i) for i in ids]

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        self._send(
            connect_packet(f"order-enrol-{secrets.token_hex(4)}", self.username, self._password)
        )
        packet_type, data = self._read(deadline)
        if packet_type != CONNACK or len(data) < 2 or data[1] != 0:
            code = data[1] if packet_type == CONNACK and len(data) > 1 else packet_type
            raise ControlError("connect", f"{self.url}: refused (reason {code})")
        self._send(_subscribe(1, CONTROL_RESPONSE_TOPIC))
        packet_type, data = self._read(deadline)
        # SUBACK: packet id, properties (a varint length, empty here), one reason code.
        if packet_type != SUBACK or data[-1] >= 0x80:
            raise ControlError("subscribe", f"{CONTROL_RESPONSE_TOPIC}: refused")

    def _take_answers(self, data: bytes) -> None:
        topic_len = int.from_bytes(data[:2], "big")
        topic = data[2 : 2 + topic_len].decode()
        try:
            decoded = decode_varint(data, 2 + topic_len)
        except ValueError:  # more than four bytes
            decoded = None
        if topic != CONTROL_RESPONSE_TOPIC or decoded is None:
            return
        props_len, used = decoded
        try:
            answers = _decode(data[used + props_len :]).responses
        except msgspec.DecodeError:
            return  # not an answer to anyone; the waiting command times out if it was ours
        self._answers.update((a.correlation, a) for a in answers if a.correlation)

    def _send(self, packet: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(packet)
        except OSError as exc:
            raise ControlError("send", SESSION_CLOSED) from exc

    def _read(self, deadline: float) -> tuple[int, bytes]:
        """One packet: its type (high nibble) and its body."""
        header = self._recv(1, deadline)
        length, shift = 0, 0
        while True:
            byte = self._recv(1, deadline)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header[0] & 0xF0, self._recv(length, deadline)

    def _recv(self, count: int, deadline: float) -> bytes:
        assert self._sock is not None
        out = bytearray()
        while len(out) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError("read", "no answer from the broker")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(count - len(out))
            except TimeoutError as exc:
                raise ControlError("read", "no answer from the broker") from exc
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            out += chunk
        return bytes(out)

    def _close(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        self._sock.close()
        self._sock = None


CONNACK: Final = 0x20
PUBLISH: Final = 0x30
SUBACK: Final = 0x90
DISCONNECT: Final = 0xE0
KEEPALIVE_S: Final = 60


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str, username: str, password: str, keepalive_s: int = KEEPALIVE_S
) -> bytes:
    """An MQTT 5 CONNECT with clean start, user name and password, no properties."""
    body = _string("MQTT") + bytes([5, 0xC2]) + struct.pack("!H", keepalive_s) + b"\x00"
    body += _string(client_id) + _string(username) + _string(password)
    return bytes([0x10]) + encode_varint(len(body)) + body


def _subscribe(packet_id: int, topic: str) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00" + _string(topic) + b"\x00"  # QoS 0
    return bytes([0x82]) + encode_varint(len(body)) + body


def _publish(topic: str, payload: bytes) -> bytes:
    body = _string(topic) + b"\x00" + payload  # QoS 0, no properties
    return bytes([PUBLISH]) + encode_varint(len(body)) + body


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
