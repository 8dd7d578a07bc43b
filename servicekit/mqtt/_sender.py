"""QoS 1 publishing: a bounded queue, the broker's Receive Maximum in flight, resends.

Each message may carry a future that ends with its PUBACK reason code (or
:data:`TOO_LARGE`). At most the broker's Receive Maximum are in flight; behind
them waits a queue of at most ``max_queued``: past it a new message is refused
with :class:`QueueFull`, and nothing queued is ever dropped to make room.
Unacked messages are resent after a reconnect: with the same packet id and DUP
when the session was present (MQTT 5 §4.4), as new messages when it was not.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NoReturn

import mqtt5
import structlog

from ._metrics import MqttMetrics
from ._types import TOO_LARGE, QueueFull
from ._wire import WRITE_HIGH_WATER, Wire

log = structlog.get_logger(__name__)

FIRST_PUBLISH_ID: Final = 2  # 1 is the SUBSCRIBE's
MAX_PACKET_ID: Final = 65535
_ERROR_CODES: Final = 0x80
_QOS1: Final = mqtt5.QoS.AT_LEAST_ONCE


@dataclass(slots=True)
class Outgoing:
    """One QoS 1 message to publish."""

    topic: str
    payload: bytes
    done: asyncio.Future[int] | None  # None: nobody waits for the PUBACK
    packet_id: int = 0


class Sender:
    """The client's outgoing messages across its connections; writes only on a ``Wire``."""

    def __init__(self, *, max_queued: int, metrics: MqttMetrics | None, name: str) -> None:
        self.max_queued = max_queued
        self.metrics = metrics
        self.name = name
        self.window = 0  # the broker's Receive Maximum for our publishes
        self.broker_max_packet: int | None = None
        self.inflight: dict[int, Outgoing] = {}
        self.queue: deque[Outgoing] = deque()
        self.ids = itertools.cycle(range(FIRST_PUBLISH_ID, MAX_PACKET_ID + 1))
        self.dropped = 0
        self.refused = 0
        # Set while nothing is queued or in flight (shutdown waits for it).
        self.idle = asyncio.Event()
        self.idle.set()

    def enqueue(self, item: Outgoing) -> None:
        """Queue ``item``.

        Raises:
            QueueFull: ``max_queued`` messages already wait; ``item`` is not queued.
        """
        if len(self.queue) >= self.max_queued:
            self._refuse(item.topic)
        self.queue.append(item)
        self.idle.clear()

    def enqueue_many(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Queue ``(topic, payload)`` messages nobody waits for; return how many were queued.

        Past ``max_queued`` the first message left out is refused as :meth:`enqueue`
        refuses one (counted, logged) and the rest are not tried: the caller sheds them.
        """
        queue = self.queue
        room = self.max_queued - len(queue)
        queued = 0
        try:
            for topic, payload in messages:
                if queued >= room:
                    self._refuse(topic)
                queue.append(Outgoing(topic, payload, None))
                queued += 1
        except QueueFull:
            pass
        if queued:
            self.idle.clear()
        return queued

    def _refuse(self, topic: str) -> NoReturn:
        self.refused += 1
        if self.metrics is not None:
            self.metrics.publish_queue_full.inc()
        if self.refused == 1 or self.refused % 1000 == 0:  # a full queue refuses in bursts
            log.warning("mqtt publish queue full, refused a new message",
                        client=self.name, topic=topic, max_queued=self.max_queued,
                        refused=self.refused)  # fmt: skip
        raise QueueFull(topic, self.max_queued)

    def on_puback(self, packet: mqtt5.PubAckPacket) -> None:
        """End the acknowledged message's future with the reason code."""
        code = packet.reason_code
        item = self.acked(packet.packet_id, int(code))
        if item is not None and int(code) >= _ERROR_CODES:
            # Definitive: resending would be refused again. The caller decides.
            if self.metrics is not None:
                self.metrics.publish_refused.labels(code.name.lower()).inc()
            log.warning("broker refused a publish", client=self.name, topic=item.topic,
                        reason=code.name.lower(), reason_str=packet.reason_str)  # fmt: skip

    def acked(self, packet_id: int, code: int) -> Outgoing | None:
        """End message ``packet_id``'s future with ``code``; the message, if it was in flight."""
        item = self.inflight.pop(packet_id, None)
        if item is None:
            log.warning("PUBACK for a packet id not in flight", packet_id=packet_id)
            return None
        if not self.queue and not self.inflight:
            self.idle.set()
        if item.done is not None and not item.done.done():
            item.done.set_result(code)
        return item

    def pump(self, wire: Wire) -> None:
        """Send queued messages while inside the window and ``wire`` is writable."""
        if not self.queue or not wire.writable:
            return
        # The per-message loop of a busy client: locals, and the packets handed to
        # the wire in one call (it writes them in one go at the end of the turn anyway).
        queue, inflight, ids = self.queue, self.inflight, self.ids
        window, max_packet = self.window, self.broker_max_packet
        room = WRITE_HIGH_WATER - wire.out_bytes
        packets: list[bytes] = []
        size = 0
        while queue and len(inflight) < window and size < room:
            item = queue.popleft()
            if max_packet is not None and len(item.payload) + len(item.topic) + 16 > max_packet:
                log.error("publish larger than the broker allows, dropped",
                          client=self.name, topic=item.topic, size=len(item.payload))  # fmt: skip
                self.drop(item, TOO_LARGE)
                continue
            packet_id = next(ids)
            while packet_id in inflight:
                packet_id = next(ids)
            item.packet_id = packet_id
            inflight[packet_id] = item
            packet = mqtt5.PublishPacket(item.topic, item.payload, qos=_QOS1,
                                         packet_id=packet_id).write()  # fmt: skip
            packets.append(packet)
            size += len(packet)
        if packets:
            wire.send_many(packets, size)

    def resend(self, wire: Wire, *, session_present: bool) -> None:
        """After CONNACK: resend what was in flight on the last connection (§4.4), then pump."""
        if not self.inflight:
            self.pump(wire)
            return
        if session_present:
            # The broker knows these packet ids: same ids, DUP set, in order.
            for item in self.inflight.values():
                self._write_publish(wire, item, duplicate=True)
            log.info("mqtt resent unacked publishes", client=self.name, count=len(self.inflight))
        else:
            # A new session: the ids mean nothing to the broker; send them anew, first.
            self.queue.extendleft(reversed(self.inflight.values()))
            self.inflight.clear()
        self.pump(wire)

    def drop(self, item: Outgoing, code: int) -> None:
        """Give up on ``item``: its future ends with ``code``."""
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.publish_dropped.inc()
        if item.done is not None and not item.done.done():
            item.done.set_result(code)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.queue and not self.inflight:
            self.idle.set()

    def _write_publish(self, wire: Wire, item: Outgoing, *, duplicate: bool) -> None:
        packet = mqtt5.PublishPacket(
            item.topic, item.payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
            packet_id=item.packet_id, duplicate=duplicate,
        )  # fmt: skip
        wire.send(packet.write())
