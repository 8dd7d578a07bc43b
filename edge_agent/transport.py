"""The MQTT seam: a small Protocol, and its paho-mqtt implementation on asyncio.

paho-mqtt 2.x is driven from the event loop through its socket callbacks
(``loop_read``/``loop_write``/``loop_misc``), as in paho's
``examples/loop_asyncio.py``: no network thread per connection, so thousands
of agents can share one process. Only the blocking TCP/TLS connect runs in
the default executor, so a slow network never stalls intake.

paho calls back inside ``loop_read`` on the event loop thread; the callbacks
here only record facts and call the handlers the publisher registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from servicekit.urls import MqttUrl

from .errors import BrokerError

# CONNACK reason code "Unsupported Protocol Version" (MQTT 5) / 1 (MQTT 3.1.1).
_UNSUPPORTED_PROTOCOL = frozenset({132, 1})


@dataclass(frozen=True)
class TransportSettings:
    """How to reach the broker. ``url`` carries user and password; never log it raw."""

    url: MqttUrl
    client_id: str
    subscriptions: tuple[str, ...]
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    connect_timeout_s: float = 10.0
    max_inflight: int = 100
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Called at each CONNECT for the MQTT Will (topic, payload), sent QoS 1, not retained.
    will: Callable[[], tuple[str, bytes]] | None = None


class TransportHandlers(Protocol):
    """What a transport reports to its owner, always on the event loop thread."""

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None: ...
    def on_message(self, topic: str, payload: bytes) -> None: ...
    def on_connection_lost(self, reason: str) -> None: ...


class Transport(Protocol):
    """An MQTT connection that publishes at QoS 1; the publisher's only view of MQTT."""

    @property
    def connected(self) -> bool: ...
    @property
    def protocol(self) -> str: ...
    async def connect(self) -> bool:
        """Connect and subscribe; return whether the broker kept our session.

        Raises:
            BrokerError: the connection failed or was refused.
        """
        ...

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue a QoS 1 PUBLISH; return its packet id (mid)."""
        ...

    async def disconnect(self) -> None: ...


TransportFactory = Callable[[TransportSettings, TransportHandlers], Transport]


class PahoTransport:
    """:class:`Transport` over paho-mqtt 2.x driven by the asyncio loop."""

    def __init__(self, settings: TransportSettings, handlers: TransportHandlers) -> None:
        self._settings = settings
        self._handlers = handlers
        self._version = MQTTProtocolVersion.MQTTv5
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._connack: asyncio.Future[bool] | None = None
        self._connected = False
        self._misc: asyncio.TimerHandle | None = None
        self._loop_thread: int | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def protocol(self) -> str:
        return "5" if self._version == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    def _new_client(self) -> paho.Client:
        s = self._settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=self._version,
            clean_session=None if self._version == MQTTProtocolVersion.MQTTv5 else False,
        )
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.connect_timeout = s.connect_timeout_s
        if s.url.username:
            client.username_pw_set(s.url.username, s.url.password)
        if s.url.tls:
            context = ssl.create_default_context(cafile=s.ca_file or None)
            if s.cert_file:
                context.load_cert_chain(s.cert_file, s.key_file or None)
            client.tls_set_context(context)
        if s.will is not None:
            client.will_set(*s.will(), qos=1, retain=False)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    async def connect(self) -> bool:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for _ in range(2):  # a second try only to fall back to MQTT 3.1.1
            try:
                return await self._connect_once()
            except _ProtocolRefused:
                self._version = MQTTProtocolVersion.MQTTv311
        raise BrokerError("broker refused MQTT 5 and 3.1.1", reason="protocol_refused")

    async def _connect_once(self) -> bool:
        assert self._loop is not None
        await self._drop_client()
        client = self._client = self._new_client()
        self._connack = self._loop.create_future()
        s = self._settings
        properties = None
        if self._version == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
        try:
            await self._loop.run_in_executor(
                None,
                functools.partial(
                    client.connect,
                    s.url.host,
                    s.url.port,
                    s.keepalive_s,
                    clean_start=False
                    if self._version == MQTTProtocolVersion.MQTTv5
                    else paho.MQTT_CLEAN_START_FIRST_ONLY,
                    properties=properties,
                ),
            )
            async with asyncio.timeout(s.connect_timeout_s):
                session_present = await self._connack
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            await self._drop_client()
            raise BrokerError(f"connect to {s.url}: {exc!r}", reason="connect_failed") from exc
        except BaseException:
            await self._drop_client()
            raise
        for topic in s.subscriptions:
            client.subscribe(topic, qos=1)
        self._connected = True
        self._schedule_misc()
        return session_present

    def publish(self, topic: str, payload: bytes) -> int:
        if self._client is None or not self._connected:
            raise BrokerError("not connected", reason="not_connected")
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_QUEUE_SIZE):
            raise BrokerError(f"publish failed: {paho.error_string(info.rc)}", reason="publish")
        return info.mid

    async def disconnect(self) -> None:
        client = self._client
        if client is not None and self._connected:
            self._connected = False
            client.disconnect()
            # Let the DISCONNECT packet go out before the socket closes.
            with contextlib.suppress(OSError):
                client.loop_write()
        await self._drop_client()

    async def _drop_client(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        client, self._client = self._client, None
        self._connected = False
        # Unwatch before the socket closes: the selector needs a live fd.
        self._unwatch()
        if client is not None:
            client.on_disconnect = None
            with contextlib.suppress(OSError):
                client._sock_close()  # paho: no public close without a loop

    # --- event loop plumbing -------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        # paho's connect() runs in the executor and calls back from that thread.
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on: a small PUBLISH then waits for the broker's
        # delayed ACK (~40 ms on Linux) before it leaves.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._call(self._watch, client, sock.fileno())

    def _watch(self, client: paho.Client, fd: int) -> None:
        assert self._loop is not None
        if client is not self._client:
            return
        self._fd = fd
        self._loop.add_reader(fd, self._read, client)

    def _unwatch(self) -> None:
        if self._fd is not None and self._loop is not None:
            # paho may already have closed the socket (EBADF); the fd is gone either way.
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(self._fd)
        self._fd = None

    def _on_socket_close(self, client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if client is self._client:
            self._call(self._unwatch)

    def _on_register_write(self, client: paho.Client, _userdata: Any, _sock: Any) -> None:
        self._call(self._watch_write, client)

    def _watch_write(self, client: paho.Client) -> None:
        if client is self._client and self._fd is not None and self._loop is not None:
            self._loop.add_writer(self._fd, self._write, client)

    def _on_unregister_write(self, client: paho.Client, _userdata: Any, _sock: Any) -> None:
        if client is self._client and self._fd is not None and self._loop is not None:
            self._call(self._unwatch_write)

    def _unwatch_write(self) -> None:
        if self._fd is not None and self._loop is not None:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(self._fd)

    def _read(self, client: paho.Client) -> None:
        client.loop_read()

    def _write(self, client: paho.Client) -> None:
        client.loop_write()

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        self._misc = self._loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        if self._client is not None:
            self._client.loop_misc()
        if self._connected:
            self._schedule_misc()

    # --- paho callbacks (event loop thread, or the executor during connect) ---

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._call(self._resolve_connack, flags.session_present, reason_code)

    def _resolve_connack(self, session_present: bool, reason_code: ReasonCode) -> None:
        future = self._connack
        if future is None or future.done():
            return
        if reason_code.is_failure:
            if reason_code.value in _UNSUPPORTED_PROTOCOL and (
                self._version == MQTTProtocolVersion.MQTTv5
            ):
                future.set_exception(_ProtocolRefused())
            else:
                future.set_exception(
                    BrokerError(f"CONNACK {reason_code.getName()}", reason="connect_refused")
                )
        else:
            future.set_result(bool(session_present))

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._call(self._lost, str(reason_code.getName()))

    def _lost(self, reason: str) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(BrokerError(f"disconnected: {reason}", reason="lost"))
        was_connected, self._connected = self._connected, False
        self._unwatch()
        if was_connected:
            self._handlers.on_connection_lost(reason)

    def _on_publish(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._handlers.on_puback(mid, int(reason_code.value), str(reason_code.getName()))

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        self._handlers.on_message(message.topic, bytes(message.payload))


class _ProtocolRefused(Exception):
    """CONNACK said the broker does not speak this protocol version."""


def default_transport(settings: TransportSettings, handlers: TransportHandlers) -> Transport:
    """The production transport factory."""
    return PahoTransport(settings, handlers)
