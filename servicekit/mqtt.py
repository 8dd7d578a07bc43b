"""The cloud side's MQTT 5 client: an asyncio protocol on the Rust ``mqtt5`` codec.

Cloud only (``mqtt5`` is in the ``bridge`` extra); the edge agent never imports
this module. Why not a library: the bridge acks each order after its Redis
write, so every message costs a PUBACK and a receipt. gmqtt and paho write each
packet with its own syscall and run a task or a thread hop per message; here
everything queued in one loop turn leaves in one ``transport.write``
(``bench/mqtt_clients.py`` measures the difference).

What it does:

- CONNECT with our Receive Maximum, Maximum Packet Size and session expiry;
  ``clean_start`` only on the first connection if asked, never on a reconnect.
- SUBSCRIBE to its filters at QoS 1 after every CONNACK. Each incoming QoS 1
  PUBLISH goes to its handler with an ``ack`` callable; the PUBACK leaves when
  the handler's owner calls it, and only on the connection the message came in
  on (packet ids belong to a connection; after a reconnect the broker resends).
- Receive Maximum is enforced here, from the CONNECT on: with that many
  messages handed out and not acked, further PUBLISH packets are parked
  unhandled (Mosquitto 2.0 does not hold a resumed session's backlog to it),
  while PUBACKs and every other packet are still handled: a handler that acks
  only after its own publishes are PUBACKed must not wait on a socket nobody
  reads. Past ``PARKED_MAX_BYTES`` of parked messages the socket's reads pause
  (TCP backpressure). A session backlog that arrives during the handshake is
  held to it too.
- QoS 1 publishing with a future per message (its PUBACK reason code), at most
  the broker's Receive Maximum in flight, a bounded queue behind that, and
  write-side backpressure: nothing new is written while the transport's buffer
  is above its high-water mark. Unacked messages are resent after a reconnect:
  with the same packet id and DUP when the session was present (MQTT 5 §4.4),
  as new messages when it was not.
- PINGREQ every half keep-alive; a broker silent for 1.5 keep-alives (while we
  are reading) is dropped. DISCONNECT from the broker is logged with its reason
  and counted; a session taken over by another client with our id (0x8E) is an
  error: two replicas configured with one client id.
- A supervisor reconnects with :class:`servicekit.backoff.Backoff`, reset after
  CONNACK+SUBACK, for as long as the broker is down; an unexpected error kills
  it loudly (:class:`servicekit.errors.LoopFailed` out of ``async with``).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, cast

import mqtt5
import structlog
from prometheus_client import CollectorRegistry, Counter

from .backoff import Backoff
from .errors import ServiceKitError
from .loops import Loops
from .urls import MqttUrl

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0
SUBSCRIBE_PACKET_ID: Final = 1  # publishes use 2..65535
_FIRST_PUBLISH_ID: Final = 2
_MAX_PACKET_ID: Final = 65535
WRITE_HIGH_WATER: Final = 256 * 1024
PARKED_MAX_BYTES: Final = 1024 * 1024
"""Incoming messages parked past the Receive Maximum before reads pause."""
DROPPED: Final = -1
"""Future result of a message dropped from a full queue (oldest first)."""
TOO_LARGE: Final = -2
"""Future result of a message larger than the broker's Maximum Packet Size."""
_ERROR_CODES: Final = 0x80

Ack = Callable[[], None]
"""Sends the PUBACK of one message (a no-op once its connection is gone)."""

Handler = Callable[[str, bytes, Ack], None]
"""Takes one message (topic, payload, ack); must not block; calls ack later or never."""

PropertyHandler = Callable[[str, bytes, Ack, str | None], None]
"""A :data:`Handler` that also takes the value of one MQTT 5 user property (None: absent)."""


class MqttError(ServiceKitError):
    """The broker refused us, broke the protocol, or went away mid-handshake."""

    def __init__(self, detail: str, reason: str = "mqtt_error") -> None:
        super().__init__(reason, detail)


@dataclass(frozen=True, slots=True)
class Subscription:
    """A QoS 1 topic filter and the handler of its messages."""

    topic_filter: str
    handler: Handler


@dataclass(frozen=True, slots=True)
class PropertySubscription:
    """A QoS 1 topic filter whose handler also gets the user property ``user_property``.

    The bridge reads the order's ``traceparent`` this way (servicekit.tracing).
    """

    topic_filter: str
    handler: PropertyHandler
    user_property: str


AnySubscription = Subscription | PropertySubscription


class MqttMetrics:
    """Counters of one client, registered as ``{prefix}_mqtt_*``."""

    def __init__(self, prefix: str, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.disconnects = Counter(
            f"{prefix}_mqtt_broker_disconnects",
            "DISCONNECT packets from the broker, by reason (session_taken_over: a client id clash)",
            ["reason"],
            **kwargs,
        )
        self.connections_lost = Counter(
            f"{prefix}_mqtt_connections_lost", "connections that ended, for any reason", **kwargs
        )
        self.publish_refused = Counter(
            f"{prefix}_mqtt_publish_refused",
            "QoS 1 publishes the broker answered with an error PUBACK, by reason",
            ["reason"],
            **kwargs,
        )
        self.publish_dropped = Counter(
            f"{prefix}_mqtt_publish_dropped",
            "publishes dropped unsent: queue full, or larger than the broker allows",
            **kwargs,
        )


@dataclass(slots=True)
class _Outgoing:
    topic: str
    payload: bytes
    done: asyncio.Future[int] | None  # None: nobody waits for the PUBACK
    packet_id: int = 0


class _Wire(asyncio.Protocol):
    """One TCP connection: frames packets in, coalesces writes out, counts unacked input."""

    def __init__(self, owner: MqttClient) -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()
        self.last_heard = 0.0
        self.unacked = 0  # messages handed to handlers on this connection, not yet acked
        # PUBLISHes read past the Receive Maximum, handed out in order once acks free room.
        self.parked: deque[tuple[mqtt5.PublishPacket, int]] = deque()
        self.parked_bytes = 0
        self.writing_paused = False
        self.reads_paused = False
        # Receive Maximum reached: parsing stops until half the window is acked
        # (hysteresis, so reads don't flap on every ack).
        self.input_blocked = False
        self.out_bytes = 0  # queued for this loop turn's write

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # Nagle + delayed ACK would add ~40 ms per small packet
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.last_heard = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        self._buffer += data
        self.process()

    def process(self) -> None:
        """Hand out parked messages the window now allows, then handle the buffer's packets."""
        owner = self._owner
        while self.parked and not owner._input_full(self):
            parked, parked_size = self.parked.popleft()
            self.parked_bytes -= parked_size
            owner._on_packet(self, parked)
        offset = 0
        with memoryview(self._buffer) as view:
            while offset < len(view):
                if owner._paused or self.parked_bytes >= PARKED_MAX_BYTES:
                    break
                try:
                    packet, size = mqtt5.read(view[offset:])
                except IndexError:  # an incomplete packet: wait for more bytes
                    break
                except ValueError as exc:
                    log.error("malformed packet from broker, closing", error=str(exc))  # noqa: TRY400
                    self.abort()
                    return
                offset += size
                if isinstance(packet, mqtt5.PublishPacket) and (
                    self.parked or owner._input_full(self)
                ):
                    self.parked.append((packet, size))
                    self.parked_bytes += size
                else:
                    owner._on_packet(self, packet)
        del self._buffer[:offset]
        owner._update_reading(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self._owner._on_lost(self, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._owner._pump()

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop turn goes out in one write."""
        if self.transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)
        self.out_bytes += len(data)

    @property
    def writable(self) -> bool:
        """Room for more publishes: the transport is below its high-water mark, and so
        is what this loop turn has queued (one pump must not queue megabytes)."""
        return (
            self.transport is not None
            and not self.writing_paused
            and (self.out_bytes < WRITE_HIGH_WATER)
        )

    def _flush(self) -> None:
        if self.transport is not None and self._out:
            self.transport.write(b"".join(self._out))
        self._out.clear()
        refill = self.out_bytes >= WRITE_HIGH_WATER
        self.out_bytes = 0
        if refill and not self.writing_paused:
            self._owner._pump()

    def set_reading(self, paused: bool) -> None:
        if self.transport is None or paused == self.reads_paused:
            return
        self.reads_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()
            self.last_heard = asyncio.get_running_loop().time()  # deaf, not silent, till now

    def abort(self) -> None:
        """Drop the connection now."""
        if self.transport is not None:
            self.transport.abort()


class MqttClient:
    """One MQTT 5 connection, kept alive by a supervisor task; an async context manager.

    Args:
        url: the broker.
        client_id: stable per replica, so a restart resumes its session.
        subscriptions: QoS 1 filters and their handlers.
        clean_start: discard a previous session on the first connection.
        session_expiry_s: how long the broker keeps our session while we are away.
        receive_maximum: unacked incoming messages we hold at most.
        max_packet_size: the largest packet the broker may send us.
        connect_wait_s: how long ``async with`` waits for the first CONNACK+SUBACK
            (None: until it comes); the supervisor goes on trying after that.
        max_queued: publishes waiting for a window slot; past it the oldest is dropped.
    """

    def __init__(
        self,
        url: MqttUrl,
        *,
        client_id: str,
        subscriptions: Sequence[AnySubscription] = (),
        clean_start: bool = False,
        session_expiry_s: int = 3600,
        receive_maximum: int = 1000,
        max_packet_size: int = 1 << 20,
        keepalive_s: int = 30,
        backoff: Backoff | None = None,
        connect_wait_s: float | None = None,
        max_queued: int = 100_000,
        ca_file: str = "",
        metrics: MqttMetrics | None = None,
        name: str = "mqtt",
    ) -> None:
        self._url = url
        self._ssl = url.ssl_context(ca_file)
        self.client_id = client_id
        self._subscriptions: list[AnySubscription] = list(subscriptions)
        self._clean_start = clean_start
        self._session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self._resume_at = receive_maximum // 2
        self._max_packet_size = max_packet_size
        self._keepalive_s = keepalive_s
        self.backoff = backoff or Backoff(0.1, 5.0)
        self._connect_wait_s = connect_wait_s
        self._max_queued = max_queued
        self.metrics = metrics
        self.name = name
        self._wire: _Wire | None = None
        self._connack: asyncio.Future[mqtt5.ConnAckPacket] | None = None
        self._subscribed = asyncio.Event()
        self._window = 0  # the broker's Receive Maximum for our publishes
        self._broker_max_packet: int | None = None
        self._inflight: dict[int, _Outgoing] = {}
        self._queue: deque[_Outgoing] = deque()
        self._ids = itertools.cycle(range(_FIRST_PUBLISH_ID, _MAX_PACKET_ID + 1))
        self._paused = False  # by the owner (pause_reading)
        self._loops: Loops | None = None
        self._closing = False
        self._entered = False
        self.connects = 0  # successful CONNACKs (tests and logs)
        self.dropped = 0

    # -- public API ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed (CONNACK and SUBACK received) right now."""
        return self._wire is not None and self._subscribed.is_set()

    @property
    def in_flight(self) -> int:
        """Publishes queued or sent and not yet acknowledged."""
        return len(self._queue) + len(self._inflight)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and forget: like :meth:`publish_acked`, without a future to await."""
        self._enqueue(_Outgoing(topic, payload, None))

    def publish_acked(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        """Publish at QoS 1; the future ends with the PUBACK reason code (or DROPPED/TOO_LARGE).

        Never raises: while disconnected or out of window the message queues,
        and it is resent until acknowledged (across reconnects).
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(_Outgoing(topic, payload, done))
        return done

    def _enqueue(self, item: _Outgoing) -> None:
        if len(self._queue) >= self._max_queued:
            self._drop(self._queue.popleft(), DROPPED)
            log.warning("mqtt publish queue full, dropped the oldest", client=self.name)
        self._queue.append(item)
        if self._wire is not None:
            self._pump()

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Add a QoS 1 subscription; only before ``async with``."""
        if self._entered:
            raise RuntimeError("subscribe before connecting")
        self._subscriptions.append(Subscription(topic_filter, handler))

    def pause_reading(self) -> None:
        """Stop reading from the broker (TCP backpressure) until :meth:`resume_reading`."""
        self._paused = True
        if self._wire is not None:
            self._update_reading(self._wire)

    def resume_reading(self) -> None:
        """Read from the broker again."""
        self._paused = False
        wire = self._wire
        if wire is not None:
            self._update_reading(wire)
            wire.process()  # packets that arrived before the pause took effect

    async def wait_connected(self) -> None:
        """Return once connected and subscribed."""
        await self._subscribed.wait()

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("MqttClient cannot be re-entered")
        self._entered = True
        self._loops = Loops()
        self._loops.start(self._supervise(), name=f"{self.name}-supervisor")
        try:
            async with asyncio.timeout(self._connect_wait_s):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("mqtt not connected yet, carrying on", client=self.name, url=str(self._url))
        except asyncio.CancelledError:
            if self._wire is not None:
                self._wire.abort()
            await self._loops.close()  # raises LoopFailed if that was the cause
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.send(mqtt5.DisconnectPacket().write())
            await asyncio.sleep(0)  # let the coalesced write go out
            wire.transport.close()
        assert self._loops is not None
        await self._loops.close()
        if wire is not None and not wire.closed.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await wire.closed.wait()
            except TimeoutError:
                wire.abort()

    # -- supervisor --------------------------------------------------------------

    async def _supervise(self) -> None:
        """Connect, keep alive, reconnect with backoff; for as long as it takes.

        It also ends by itself once the client is closing: a cancellation that
        lands just as one of its timeouts fires can be lost on Python 3.11, and
        the supervisor must not reconnect a client that is shutting down.
        """
        while not self._closing:
            wire = await self._connect_once()
            if wire is not None:
                await self._keepalive(wire)
            if not self._closing:
                await self.backoff.wait()

    async def _connect_once(self) -> _Wire | None:
        loop = asyncio.get_running_loop()
        wire: _Wire | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, wire = await loop.create_connection(
                    lambda: _Wire(self), self._url.host, self._url.port, ssl=self._ssl
                )
                self._wire = wire
                connack = await self._handshake(wire)
        except (OSError, TimeoutError, MqttError) as exc:
            log.warning("mqtt connect failed", client=self.name, error=repr(exc))
            if wire is not None:
                wire.abort()
            if self._wire is wire:
                self._wire = None
            return None
        self.connects += 1
        self._clean_start = False  # from now on, resume our own session
        log.info("mqtt connected", client=self.name, session_present=connack.session_present)
        self._resend(wire, session_present=connack.session_present)
        if self._subscriptions:
            filters = [
                mqtt5.TopicFilter(s.topic_filter, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
                for s in self._subscriptions
            ]
            wire.send(mqtt5.SubscribePacket(SUBSCRIBE_PACKET_ID, filters).write())
        else:
            self._on_subscribed()
        return wire

    async def _handshake(self, wire: _Wire) -> mqtt5.ConnAckPacket:
        self._connack = asyncio.get_running_loop().create_future()
        password = self._url.password.encode() if self._url.password else None
        connect = mqtt5.ConnectPacket(
            self.client_id,
            username=self._url.username,
            password=password,
            clean_start=self._clean_start,
            keep_alive=self._keepalive_s,
            session_expiry_interval=self._session_expiry_s,
            receive_max=self.receive_maximum,
            max_packet_size=self._max_packet_size,
        )
        wire.send(connect.write())
        connack = await self._connack
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise MqttError(f"broker refused: {connack.reason_code.name}", "connect_refused")
        if connack.server_keep_alive:  # the broker may impose its own keep-alive
            self._keepalive_s = connack.server_keep_alive
        self._window = max(1, min(connack.receive_max, _MAX_PACKET_ID - 1))
        self._broker_max_packet = connack.max_packet_size
        return connack

    async def _keepalive(self, wire: _Wire) -> None:
        loop = asyncio.get_running_loop()
        while not wire.closed.is_set():
            try:
                async with asyncio.timeout(self._keepalive_s / 2):
                    await wire.closed.wait()
            except TimeoutError:
                # While our reads are paused we cannot hear the broker; our
                # PINGREQs still tell it we are alive.
                silent = loop.time() - wire.last_heard > self._keepalive_s * 1.5
                if silent and not wire.reads_paused:
                    log.warning("broker silent past keep-alive, reconnecting", client=self.name)
                    wire.abort()
                else:
                    wire.send(mqtt5.PingReqPacket().write())

    def _on_subscribed(self) -> None:
        self._subscribed.set()
        self.backoff.reset()

    # -- incoming ------------------------------------------------------------------

    def _input_full(self, wire: _Wire) -> bool:
        if wire.unacked >= self.receive_maximum:
            wire.input_blocked = True
        return self._paused or wire.input_blocked

    def _update_reading(self, wire: _Wire) -> None:
        wire.set_reading(self._paused or wire.parked_bytes >= PARKED_MAX_BYTES)

    def _on_packet(self, wire: _Wire, packet: Any) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            self._on_publish(wire, packet)
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(wire, packet)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            self._on_suback(wire, packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self._on_disconnect(packet)

    def _on_suback(self, wire: _Wire, packet: mqtt5.SubAckPacket) -> None:
        granted = (mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,)
        if all(code in granted for code in packet.reason_codes):
            log.info("mqtt subscribed", client=self.name,
                     filters=[s.topic_filter for s in self._subscriptions])  # fmt: skip
            self._on_subscribed()
        else:
            codes = [code.name for code in packet.reason_codes]
            log.error("subscription refused", client=self.name, codes=codes)
            wire.abort()

    def _on_disconnect(self, packet: mqtt5.DisconnectPacket) -> None:
        reason = packet.reason_code.name.lower()
        if self.metrics is not None:
            self.metrics.disconnects.labels(reason).inc()
        if packet.reason_code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER:
            log.error(
                "mqtt session taken over: another client connected with our client id",
                client=self.name, client_id=self.client_id, reason=reason,
                reason_str=packet.reason_str,
            )  # fmt: skip
        else:
            log.warning("broker disconnected us", client=self.name, reason=reason,
                        reason_str=packet.reason_str)  # fmt: skip

    def _on_publish(self, wire: _Wire, packet: mqtt5.PublishPacket) -> None:
        sub = self._subscription_for(packet.topic)
        packet_id = packet.packet_id
        if packet.qos == mqtt5.QoS.AT_MOST_ONCE or packet_id is None:
            ack: Ack = _no_ack
        else:
            wire.unacked += 1
            acked = False

            def ack() -> None:
                nonlocal acked
                # Only on the connection the message came in on: packet ids
                # belong to it, and after a reconnect the broker resends.
                if acked or wire is not self._wire:
                    return
                acked = True
                wire.unacked -= 1
                wire.send(mqtt5.PubAckPacket(packet_id).write())
                if wire.input_blocked and wire.unacked <= self._resume_at:
                    wire.input_blocked = False
                    if not self._paused:
                        wire.set_reading(False)
                        asyncio.get_running_loop().call_soon(wire.process)

        if sub is None:
            log.warning("message on a topic we did not subscribe to", topic=packet.topic)
            ack()
            return
        try:
            if isinstance(sub, PropertySubscription):
                value = _user_property(packet.user_properties, sub.user_property)
                sub.handler(packet.topic, packet.payload, ack, value)
            else:
                sub.handler(packet.topic, packet.payload, ack)
        except Exception:
            # Isolation boundary: a bug in one message's handling must not
            # kill the connection; the message stays unacked.
            log.exception("message not taken", client=self.name, topic=packet.topic)

    def _subscription_for(self, topic: str) -> AnySubscription | None:
        if len(self._subscriptions) == 1:
            return self._subscriptions[0]
        for sub in self._subscriptions:
            if topic_matches(sub.topic_filter, topic):
                return sub
        return None

    def _on_lost(self, wire: _Wire, exc: Exception | None) -> None:
        if wire is not self._wire:
            return
        self._wire = None
        self._subscribed.clear()
        if self.metrics is not None:
            self.metrics.connections_lost.inc()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(MqttError("connection closed before CONNACK"))
        if not self._closing:
            log.warning("mqtt connection lost", client=self.name, error=repr(exc) if exc else None)

    # -- outgoing ------------------------------------------------------------------

    def _on_puback(self, wire: _Wire, packet: mqtt5.PubAckPacket) -> None:
        item = self._inflight.pop(packet.packet_id, None)
        if item is None:
            log.warning("PUBACK for a packet id not in flight", packet_id=packet.packet_id)
            return
        code = packet.reason_code
        if int(code) >= _ERROR_CODES:
            # Definitive: resending would be refused again. The caller decides.
            if self.metrics is not None:
                self.metrics.publish_refused.labels(code.name.lower()).inc()
            log.warning("broker refused a publish", client=self.name, topic=item.topic,
                        reason=code.name.lower(), reason_str=packet.reason_str)  # fmt: skip
        if item.done is not None and not item.done.done():
            item.done.set_result(int(code))
        if self._queue:
            self._pump()

    def _pump(self) -> None:
        """Send queued messages while connected, inside the window, and writable."""
        wire = self._wire
        if wire is None or self._connack is None or not self._connack.done():
            return
        while self._queue and len(self._inflight) < self._window and wire.writable:
            item = self._queue.popleft()
            if self._broker_max_packet is not None and (
                len(item.payload) + len(item.topic) + 16 > self._broker_max_packet
            ):
                log.error("publish larger than the broker allows, dropped",
                          client=self.name, topic=item.topic, size=len(item.payload))  # fmt: skip
                self._drop(item, TOO_LARGE)
                continue
            item.packet_id = self._next_id()
            self._inflight[item.packet_id] = item
            self._write_publish(wire, item, duplicate=False)

    def _next_id(self) -> int:
        while True:
            packet_id = next(self._ids)
            if packet_id not in self._inflight:
                return packet_id

    def _write_publish(self, wire: _Wire, item: _Outgoing, *, duplicate: bool) -> None:
        packet = mqtt5.PublishPacket(
            item.topic, item.payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
            packet_id=item.packet_id, duplicate=duplicate,
        )  # fmt: skip
        wire.send(packet.write())

    def _resend(self, wire: _Wire, *, session_present: bool) -> None:
        """After CONNACK: resend what was in flight on the last connection (§4.4)."""
        if not self._inflight:
            self._pump()
            return
        if session_present:
            # The broker knows these packet ids: same ids, DUP set, in order.
            for item in self._inflight.values():
                self._write_publish(wire, item, duplicate=True)
            log.info("mqtt resent unacked publishes", client=self.name, count=len(self._inflight))
        else:
            # A new session: the ids mean nothing to the broker; send them anew, first.
            self._queue.extendleft(reversed(self._inflight.values()))
            self._inflight.clear()
        self._pump()

    def _drop(self, item: _Outgoing, code: int) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.publish_dropped.inc()
        if item.done is not None and not item.done.done():
            item.done.set_result(code)


def _user_property(properties: list[tuple[str, str]], name: str) -> str | None:
    """The first value of the user property ``name``, or None."""
    for key, value in properties:
        if key == name:
            return value
    return None


def _no_ack() -> None:
    """QoS 0 messages have nothing to acknowledge."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+``, ``#``, ``$share/{group}/`` prefix)."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    parts = topic.split("/")
    for index, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if index >= len(parts) or (level not in ("+", parts[index])):
            return False
    return len(parts) == len(topic_filter.split("/"))
