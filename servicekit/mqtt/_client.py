"""The MQTT client: the connection's supervisor, the handshake, and packets in and out.

The module docstring of :mod:`servicekit.mqtt` says what it does; the
connection itself is :mod:`._wire`, publishing :mod:`._sender`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Self

import mqtt5
import structlog

from ..backoff import Backoff
from ..loops import Loops
from ..urls import MqttUrl
from ._metrics import MqttMetrics
from ._sender import MAX_PACKET_ID, Outgoing, Sender
from ._types import (
    Ack,
    AnySubscription,
    Handler,
    MqttError,
    PropertySubscription,
    Subscription,
    no_ack,
    topic_matches,
    user_property,
)
from ._wire import Wire

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S: Final = 10.0
SUBSCRIBE_PACKET_ID: Final = 1  # publishes use 2..65535


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
        max_queued: publishes waiting for a window slot; past it a new one raises
            :class:`QueueFull` (nothing queued is dropped).
        close_grace_s: how long leaving ``async with`` waits, while connected, for
            queued and unacked publishes to be acknowledged before it disconnects.
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
        close_grace_s: float = 5.0,
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
        self._close_grace_s = close_grace_s
        self.metrics = metrics
        self.name = name
        self._wire: Wire | None = None
        self._connack: asyncio.Future[mqtt5.ConnAckPacket] | None = None
        self._subscribed = asyncio.Event()
        self._sender = Sender(max_queued=max_queued, metrics=metrics, name=name)
        self._paused = False  # by the owner (pause_reading)
        self._loops: Loops | None = None
        self._closing = False
        self._entered = False
        self.connects = 0  # successful CONNACKs (tests and logs)

    # -- public API ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed (CONNACK and SUBACK received) right now."""
        return self._wire is not None and self._subscribed.is_set()

    @property
    def in_flight(self) -> int:
        """Publishes queued or sent and not yet acknowledged."""
        return len(self._sender.queue) + len(self._sender.inflight)

    @property
    def dropped(self) -> int:
        """Publishes dropped unsent: larger than the broker allows."""
        return self._sender.dropped

    @property
    def refused(self) -> int:
        """Publishes refused with :class:`QueueFull`."""
        return self._sender.refused

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and forget: like :meth:`publish_acked`, without a future to await.

        Raises:
            QueueFull: ``max_queued`` messages already wait; this one is not sent.
        """
        self._enqueue(Outgoing(topic, payload, None))

    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish ``(topic, payload)`` pairs as :meth:`publish` does, in one pump.

        Returns how many were queued: when ``max_queued`` is reached the first
        message left out is refused (counted and logged, not raised) and the rest
        are not tried.
        """
        queued = self._sender.enqueue_many(messages)
        if queued and self._wire is not None:
            self._pump()
        return queued

    def publish_acked(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        """Publish at QoS 1; the future ends with the PUBACK reason code (or TOO_LARGE).

        While disconnected or out of window the message queues, and it is
        resent until acknowledged (across reconnects).

        Raises:
            QueueFull: ``max_queued`` messages already wait; this one is not sent.
        """
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(Outgoing(topic, payload, done))
        return done

    def _enqueue(self, item: Outgoing) -> None:
        self._sender.enqueue(item)
        if self._wire is not None:
            self._pump()

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Add a QoS 1 subscription; only before ``async with``."""
        if self._entered:
            raise RuntimeError("subscribe before connecting")
        self._subscriptions.append(Subscription(topic_filter, handler))

    def pause_reading(self) -> None:
        """Hand out no more messages until :meth:`resume_reading`.

        The socket is still read: PUBACKs and PINGRESPs are heard, and keep-alive
        still finds a dead broker. Messages that arrive meanwhile wait unacked,
        so the broker sends at most our Receive Maximum of them.
        """
        self._paused = True

    def resume_reading(self) -> None:
        """Hand out messages again, those held during the pause first."""
        self._paused = False
        wire = self._wire
        if wire is not None:
            wire.process()

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
        await self._wait_acked()
        self._closing = True
        wire = self._wire
        if wire is not None and wire.transport is not None:
            wire.close_now(mqtt5.DisconnectPacket().write())
        assert self._loops is not None
        await self._loops.close()
        if wire is not None and not wire.closed.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await wire.closed.wait()
            except TimeoutError:
                wire.abort()

    async def _wait_acked(self) -> None:
        """Up to the grace period, wait for every queued and in-flight publish to be acked.

        Only while connected: with the broker gone no PUBACK can come, and the
        unacked messages are the caller's to recover (a status query, an agent's resend).
        """
        wire = self._wire
        if self._sender.idle.is_set() or wire is None or not self._subscribed.is_set():
            return
        idle = asyncio.ensure_future(self._sender.idle.wait())
        lost = asyncio.ensure_future(wire.closed.wait())
        try:
            await asyncio.wait({idle, lost}, timeout=self._close_grace_s,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            idle.cancel()
            lost.cancel()
        if not self._sender.idle.is_set():
            log.warning("mqtt closing with publishes unacked", client=self.name,
                        unacked=self.in_flight, grace_s=self._close_grace_s,
                        connected=not wire.closed.is_set())  # fmt: skip

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

    async def _connect_once(self) -> Wire | None:
        loop = asyncio.get_running_loop()
        wire: Wire | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, wire = await loop.create_connection(
                    lambda: Wire(self), self._url.host, self._url.port, ssl=self._ssl
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
        self._sender.resend(wire, session_present=connack.session_present)
        if self._subscriptions:
            filters = [
                mqtt5.TopicFilter(s.topic_filter, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
                for s in self._subscriptions
            ]
            wire.send(mqtt5.SubscribePacket(SUBSCRIBE_PACKET_ID, filters).write())
        else:
            self._on_subscribed()
        return wire

    async def _handshake(self, wire: Wire) -> mqtt5.ConnAckPacket:
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
        self._sender.window = max(1, min(connack.receive_max, MAX_PACKET_ID - 1))
        self._sender.broker_max_packet = connack.max_packet_size
        return connack

    async def _keepalive(self, wire: Wire) -> None:
        loop = asyncio.get_running_loop()
        while not wire.closed.is_set():
            try:
                async with asyncio.timeout(self._keepalive_s / 2):
                    await wire.closed.wait()
            except TimeoutError:
                silent = loop.time() - wire.last_heard > self._keepalive_s * 1.5
                if silent:
                    log.warning("broker silent past keep-alive, reconnecting", client=self.name)
                    wire.abort()
                else:
                    wire.send(mqtt5.PingReqPacket().write())

    def _on_subscribed(self) -> None:
        self._subscribed.set()
        self.backoff.reset()

    # -- incoming ------------------------------------------------------------------

    def _input_full(self, wire: Wire) -> bool:
        if wire.unacked >= self.receive_maximum:
            wire.input_blocked = True
        return self._paused or wire.input_blocked

    def _over_receive_maximum(self, wire: Wire) -> bool:
        """More unacked messages than our Receive Maximum: a compliant broker never does it."""
        return wire.unacked + len(wire.parked) > self.receive_maximum

    def _receive_maximum_exceeded(self, wire: Wire) -> None:
        log.error("broker sent past our receive maximum, disconnecting", client=self.name,
                  receive_maximum=self.receive_maximum, unacked=wire.unacked,
                  parked=len(wire.parked), parked_bytes=wire.parked_bytes)  # fmt: skip
        if self.metrics is not None:
            self.metrics.receive_maximum_exceeded.inc()
        reason = mqtt5.DisconnectReasonCode.RECEIVE_MAX_EXCEEDED
        wire.parked.clear()
        wire.parked_bytes = 0
        wire.close_now(mqtt5.DisconnectPacket(reason_code=reason).write())

    def _on_packet(self, wire: Wire, packet: Any) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            self._on_publish(wire, packet)
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(packet)
        elif isinstance(packet, mqtt5.ConnAckPacket):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            self._on_suback(wire, packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self._on_disconnect(packet)

    def _on_suback(self, wire: Wire, packet: mqtt5.SubAckPacket) -> None:
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

    def _on_publish(self, wire: Wire, packet: mqtt5.PublishPacket) -> None:
        sub = self._subscription_for(packet.topic)
        packet_id = packet.packet_id
        if packet.qos == mqtt5.QoS.AT_MOST_ONCE or packet_id is None:
            ack: Ack = no_ack
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
                wire.send_ack(packet_id)
                if wire.input_blocked and wire.unacked <= self._resume_at:
                    wire.input_blocked = False
                    if not self._paused:
                        asyncio.get_running_loop().call_soon(wire.process)

        if sub is None:
            log.warning("message on a topic we did not subscribe to", topic=packet.topic)
            ack()
            return
        try:
            if isinstance(sub, PropertySubscription):
                value = user_property(packet.user_properties, sub.user_property)
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

    def _on_lost(self, wire: Wire, exc: Exception | None) -> None:
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

    def _on_puback(self, packet: mqtt5.PubAckPacket) -> None:
        self._sender.on_puback(packet)
        if self._sender.queue:
            self._pump()

    def _on_puback_ok(self, packet_id: int, code: int) -> None:
        """A PUBACK without properties and with a success code, read by the wire itself."""
        self._sender.acked(packet_id, code)
        if self._sender.queue:
            self._pump()

    def _pump(self) -> None:
        """Send queued messages while connected, inside the window, and writable."""
        wire = self._wire
        if wire is None or self._connack is None or not self._connack.done():
            return
        self._sender.pump(wire)
