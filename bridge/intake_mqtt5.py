"""An :class:`bridge.intake.Intake` of our own: asyncio protocol + the Rust ``mqtt5`` codec.

Why not a client library: the bridge acks after its Redis write, so every
message costs a PUBACK and a receipt. gmqtt and paho write each of those with
its own syscall and run a task or a thread hop per message; here the acks and
receipts of a whole batch leave in one ``transport.write`` per loop turn.

What it does (MQTT 5): CONNECT with clean start off, a session expiry and our
Receive Maximum (the broker never has more than that many unacked messages
out to us); SUBSCRIBE to the shared orders filter at QoS 1; PINGREQ every half
keep-alive, and abort when the broker stays silent; reconnect with capped,
jittered backoff. A message is acked only when its handler task returned, and
only on the connection it came in on: after a reconnect the broker resends
what was not acked, and dedup answers ``duplicate``. Receipts are QoS 1 but
not resent after a reconnect; the agents' resend on timeout covers that.
Receipts waiting for a free packet id queue in a bounded deque; past its
bound the oldest is dropped and counted (``receipts_dropped``).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, cast

import mqtt5
import structlog

from schemas.names import shared_orders_subscription
from servicekit.urls import MqttUrl

from .errors import IntakeError
from .intake import MessageSink

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0
SUBSCRIBE_PACKET_ID = 1
MAX_QUEUED_RECEIPTS = 100_000


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Return when the first of ``waits`` finishes; cancel the others."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _no_ack() -> None:
    """QoS 0 messages have nothing to acknowledge."""


class _Wire(asyncio.Protocol):
    """One TCP connection: frames packets in, coalesces writes out."""

    def __init__(self, owner: Mqtt5Intake) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.last_heard = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.last_heard = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        self._buffer += data
        self.process()

    def process(self) -> None:
        """Handle the whole packets in the buffer, stopping early while paused."""
        offset = 0
        with memoryview(self._buffer) as view:
            while offset < len(view) and not self._owner.reading_paused:
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for more bytes
                    break
                except ValueError as exc:
                    log.exception("malformed packet from broker, closing", error=str(exc))
                    self.abort()
                    return
                offset += size
                self._owner._on_packet(self, packet)
        del self._buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self._owner._on_lost(self, exc)

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop turn goes out in one write."""
        if self.transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        if self.transport is not None and self._out:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abort()


class Mqtt5Intake:
    """The shared QoS 1 subscription, acked after the handler; an async context manager."""

    def __init__(
        self,
        url: MqttUrl,
        sink: MessageSink,
        *,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        receive_maximum: int,
        keepalive_s: int = 30,
        backoff_max_s: float = 5.0,
        ca_file: str = "",
    ) -> None:
        self._url = url
        self._ssl = url.ssl_context(ca_file)
        self._sink = sink
        self._client_id = client_id
        self._subscription = shared_orders_subscription(share_group)
        self._session_expiry_s = session_expiry_s
        self._receive_maximum = receive_maximum
        self._keepalive_s = keepalive_s
        self._backoff_max_s = backoff_max_s
        self._wire: _Wire | None = None
        self._connack: asyncio.Future[Any] | None = None
        self._subscribed = asyncio.Event()
        self._free_ids: deque[int] = deque()
        self._waiting: deque[tuple[str, bytes]] = deque()
        self.receipts_dropped = 0
        self.paused = False
        self._handshaking = False
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._wire is not None and self._subscribed.is_set()

    def publish(self, topic: str, payload: bytes) -> None:
        if self._wire is None or not self._subscribed.is_set():
            raise IntakeError("not connected")
        if self._free_ids and not self._waiting:
            self._send_publish(self._wire, self._free_ids.popleft(), topic, payload)
            return
        if len(self._waiting) >= MAX_QUEUED_RECEIPTS:
            self._waiting.popleft()
            self.receipts_dropped += 1
        self._waiting.append((topic, payload))

    def _send_publish(self, wire: _Wire, packet_id: int, topic: str, payload: bytes) -> None:
        packet = mqtt5.PublishPacket(
            topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=packet_id
        )
        wire.send(packet.write())

    @property
    def reading_paused(self) -> bool:
        """Paused, except while a handshake must still read its CONNACK and SUBACK."""
        return self.paused and not self._handshaking

    def pause_reading(self) -> None:
        self.paused = True
        if not self._handshaking and self._wire is not None and self._wire.transport is not None:
            self._wire.transport.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.transport.resume_reading()
            wire.last_heard = asyncio.get_running_loop().time()  # deaf, not silent, till now
            wire.process()  # packets that arrived before the pause took effect

    async def __aenter__(self) -> Self:
        attempt = 0
        while not await self._connect_once():
            attempt += 1
            await asyncio.sleep(self._backoff_s(attempt))
        self._supervisor = asyncio.create_task(self._supervise(), name="mqtt-supervisor")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.send(mqtt5.DisconnectPacket().write())
            await asyncio.sleep(0)  # let the coalesced write go out
            wire.transport.close()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await wire.closed.wait()
            except TimeoutError:
                wire.abort()

    async def _supervise(self) -> None:
        """Keep the connection alive: ping, detect silence, reconnect with backoff."""
        attempt = 0
        while True:
            wire = self._wire
            if wire is not None:
                await self._keepalive(wire)
            attempt += 1
            await asyncio.sleep(self._backoff_s(attempt))
            if await self._connect_once():
                attempt = 0

    async def _keepalive(self, wire: _Wire) -> None:
        loop = asyncio.get_running_loop()
        interval = self._keepalive_s / 2
        while not wire.closed.is_set():
            try:
                async with asyncio.timeout(interval):
                    await wire.closed.wait()
            except TimeoutError:
                # While our reads are paused we cannot hear the broker; our
                # PINGREQs still tell it we are alive.
                silent = loop.time() - wire.last_heard > self._keepalive_s * 1.5
                if silent and not self.reading_paused:
                    log.warning("broker silent past keep-alive, reconnecting")
                    wire.abort()
                else:
                    wire.send(mqtt5.PingReqPacket().write())

    async def _connect_once(self) -> bool:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self), self._url.host, self._url.port, ssl=self._ssl
                )
                self._wire = wire
                self._handshaking = True
                try:
                    session_present = await self._handshake(wire)
                finally:
                    self._handshaking = False
                if self.paused:
                    self.pause_reading()
        except (OSError, TimeoutError, IntakeError) as exc:
            log.warning("mqtt connect failed", error=repr(exc))
            if self._wire is not None:
                self._wire.abort()
            self._wire = None
            return False
        log.info("mqtt connected", session_present=session_present)
        return True

    async def _handshake(self, wire: _Wire) -> bool:
        """CONNECT, CONNACK, SUBSCRIBE, SUBACK; returns whether the session was present."""
        self._connack = asyncio.get_running_loop().create_future()
        password = self._url.password.encode() if self._url.password else None
        connect = mqtt5.ConnectPacket(
            self._client_id,
            username=self._url.username,
            password=password,
            clean_start=False,
            keep_alive=self._keepalive_s,
            session_expiry_interval=self._session_expiry_s,
            receive_max=self._receive_maximum,
        )
        wire.send(connect.write())
        connack = await self._connack
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise IntakeError(f"broker refused: {connack.reason_code.name}")
        if connack.server_keep_alive:  # the broker may impose its own keep-alive
            self._keepalive_s = connack.server_keep_alive
        self._free_ids = deque(range(2, min(connack.receive_max, 65535) + 1))
        topic = mqtt5.TopicFilter(self._subscription, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
        wire.send(mqtt5.SubscribePacket(SUBSCRIBE_PACKET_ID, [topic]).write())
        await _first(self._subscribed.wait(), wire.closed.wait())
        if not self._subscribed.is_set():
            raise IntakeError("connection closed before SUBACK")
        return bool(connack.session_present)

    def _on_packet(self, wire: _Wire, packet: Any) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            self._on_publish(wire, packet)
        elif isinstance(packet, mqtt5.PubAckPacket):
            if self._waiting:
                topic, payload = self._waiting.popleft()
                self._send_publish(wire, packet.packet_id, topic, payload)
            else:
                self._free_ids.append(packet.packet_id)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            codes = packet.reason_codes
            if all(code == mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE for code in codes):
                log.info("mqtt subscribed", subscription=self._subscription)
                self._subscribed.set()
            else:
                log.error("subscription refused", codes=[c.name for c in codes])
                wire.abort()
        elif isinstance(packet, mqtt5.DisconnectPacket):
            log.warning("broker disconnected us", reason=packet.reason_code.name)

    def _on_publish(self, wire: _Wire, packet: mqtt5.PublishPacket) -> None:
        packet_id = packet.packet_id
        if packet.qos == mqtt5.QoS.AT_MOST_ONCE or packet_id is None:
            ack = _no_ack
        else:

            def ack() -> None:
                # Only on the connection the message came in on: packet ids
                # belong to it, and after a reconnect the broker resends.
                if wire is self._wire:
                    wire.send(mqtt5.PubAckPacket(packet_id).write())

        try:
            self._sink(packet.topic, packet.payload, ack)
        except Exception:
            # Isolation boundary: a bug in one message's handling must not
            # kill the connection; the message stays unacked.
            log.exception("message not taken", topic=packet.topic)

    def _on_lost(self, wire: _Wire, exc: Exception | None) -> None:
        if wire is self._wire:
            self._wire = None
            self._subscribed.clear()
            self._waiting.clear()  # receipts are advisory; agents resend
            if self._connack is not None and not self._connack.done():
                self._connack.set_exception(IntakeError("connection closed before CONNACK"))
            if not self._closing:
                log.warning("mqtt connection lost", error=repr(exc) if exc else None)

    def _backoff_s(self, attempt: int) -> float:
        cap = min(self._backoff_max_s, 0.1 * 2**attempt)
        return random.uniform(cap / 2, cap)
