"""Lightweight devices: many MQTT 5 devices on one event loop, one in-memory outbox per process.

A real agent (:mod:`fleet.devices`) costs its own SQLite outbox, paho client and
asyncio tasks; past a few hundred orders a second the simulator, not the
stack, is the limit. A :class:`LightPool` keeps what the cloud sees of a
device and drops the rest:

* one MQTT 5 connection per device (its own client id, ``clean_start`` off and
  a session expiry like the agent's), CONNECT with the agent's Will
  (``Health(online=False)`` on its health topic, QoS 1), SUBSCRIBE to its
  receipts and status topics at QoS 1, PUBACK for everything delivered to it,
  PINGREQ when idle, DISCONNECT on a clean close;
* orders published at QoS 1 on its orders topic (``attempts`` naming
  ``region`` in geo mode) and published again, as a new message, until a
  receipt ``accepted``/``duplicate`` settles them: after ``receipt_timeout_s``
  without one, after a ``pending`` receipt, and at once on every reconnect;
* a ``StatusQuery`` for receipted orders whose terminal status was not heard
  ``status_query_delay_s`` after the receipt, asked again with a doubling
  wait capped at ``status_query_max_interval_s``;
* health (``online=True`` with the outbox depth) on connect and every
  ``health_interval_s``.

What it drops: a process and a SQLite file per device, the localhost HTTP
intake, device commands (the cmd topics are not subscribed), MQTT 3.1.1
fallback, TLS client certificates and region failover. The pool's outbox is
one dict for all its devices, so a process crash loses it, which a load test
does not need to survive. Every packet is encoded and parsed here (a few
fixed shapes), and the PUBACKs a device owes wait up to ``ack_delay_s`` to
leave with its next write (mostly the next order's), so a device costs a socket
and a few small objects, and an order about one send.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import random
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import structlog

from schemas import Health, Item, Order, StatusQuery, encode, names
from schemas.messages import MAX_QUERIED_ORDERS
from servicekit.mqtt_varint import decode_varint, encode_varint
from servicekit.urls import MqttUrl

from .tracker import TERMINAL, Tracker

log = structlog.get_logger(__name__)

KEEPALIVE_S = 30
SESSION_EXPIRY_S = 7 * 24 * 3600
TICK_S = 0.1
CONNECT_TIMEOUT_S = 10.0
# Connection attempts in flight per pool. Thousands of devices of one process
# reconnecting at once (a broker restart) otherwise starve its event loop: their
# CONNACKs are read after the timeout, every attempt is aborted and made again, and
# the fleet never comes back. A real agent's connect runs in a 6-thread executor.
CONNECTS_IN_FLIGHT = 200
# PUBACKs a device owes wait up to this long, or until it has this many, to leave
# with its next write: mostly the next order's, instead of costing a send (and a
# broker wakeup) of their own. At 0.1 s, 1,250 orders/s over 500 devices still cost
# 0.79 PUBACK-only sends per order (a device's next order is 0.4 s away on average);
# the broker's in-flight window (1,000 in the stack's config) is far from 16.
ACK_DELAY_S = 1.0
ACKS_HELD = 16
SETTLED = frozenset({"accepted", "duplicate"})
# Every order leaves objects that live until the run ends (the tracker's entries, the
# outbox's): with the default threshold (700) the collector ran every few orders and
# its older generations walked them again and again, about a third of a light order's
# Python time. While a pool runs, the objects before it are frozen out of the
# collector and young collections wait for this many new objects.
GC_GEN0 = 50_000


class _Answer(msgspec.Struct):
    order_id: str | None = None
    result: str = ""
    status: str = ""
    at: int = 0  # a status's: when the pipeline set it (its wall clock, ms)


_answer = msgspec.msgpack.Decoder(_Answer)


def _utf8(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_varint(len(body)) + body


def connect_packet(client_id: str, url: MqttUrl, will: tuple[str, bytes]) -> bytes:
    """MQTT 5 CONNECT: clean start off, the agent's session expiry, a QoS 1 Will."""
    flags = 0x04 | 0x08  # Will, Will QoS 1; clean start off
    payload = _utf8(client_id) + b"\x00" + _utf8(will[0]) + _utf8(will[1])
    if url.username:
        flags |= 0x80
        payload += _utf8(url.username)
        if url.password is not None:
            flags |= 0x40
            payload += _utf8(url.password)
    props = b"\x11" + struct.pack("!I", SESSION_EXPIRY_S)
    header = _utf8("MQTT") + bytes([5, flags]) + struct.pack("!H", KEEPALIVE_S)
    return _packet(0x10, header + encode_varint(len(props)) + props + payload)


def subscribe_packet(packet_id: int, topics: tuple[str, ...]) -> bytes:
    """MQTT 5 SUBSCRIBE at QoS 1."""
    body = struct.pack("!H", packet_id) + b"\x00"
    body += b"".join(_utf8(t) + b"\x01" for t in topics)
    return _packet(0x82, body)


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """MQTT 5 PUBLISH at QoS 1 without properties; ``topic`` already length-prefixed."""
    body_len = len(topic) + 3 + len(payload)
    return (
        b"\x32" + encode_varint(body_len) + topic + struct.pack("!H", packet_id) + b"\x00" + payload
    )


def puback(packet_id: int) -> bytes:
    """PUBACK, success (the reason code omitted, MQTT 5 §3.4.2.1)."""
    return b"\x40\x02" + struct.pack("!H", packet_id)


PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def split_packets(data: bytearray) -> Iterator[tuple[int, bytes]]:
    """(first byte, body) of each whole packet in ``data``; consumed ones are removed."""
    offset = 0
    size = len(data)
    try:
        while offset + 2 <= size:
            decoded = decode_varint(data, offset + 1)
            if decoded is None:
                return
            length, pos = decoded
            if pos + length > size:
                return
            yield data[offset], bytes(data[pos : pos + length])
            offset = pos + length
    finally:
        del data[:offset]


@dataclass(slots=True)
class _Pending:
    """An order in the pool's outbox: not receipted yet, or receipted without a status."""

    device: LightDevice
    order_id: str
    payload: bytes
    sent_at: float = 0.0  # last PUBLISH (monotonic); 0: not sent yet
    receipted: bool = False
    query_at: float = 0.0
    query_wait: float = 0.0


class LightDevice(asyncio.Protocol):
    """One simulated device: its MQTT connection; its orders live in the pool's outbox."""

    def __init__(self, pool: LightPool, device_id: str) -> None:
        self.pool = pool
        self.device_id = device_id
        self.orders_topic = names.orders_topic(device_id)
        self._orders_topic = _utf8(self.orders_topic)
        self._query_topic = _utf8(names.status_query_topic(device_id))
        self._health_topic = names.health_topic(device_id)
        self._health_topic_raw = _utf8(self._health_topic)
        self.receipts_topic = names.receipts_topic(device_id).encode()
        self.status_topic = names.status_topic(device_id).encode()
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.seq = 0
        # This device's part of the pool's outbox, by order id.
        self.pending: dict[str, _Pending] = {}
        self.unreceipted = 0
        self._packet_id = 0
        self._buffer = bytearray()
        self._acks: list[bytes] = []  # PUBACKs owed, sent with the next write
        self._connack: asyncio.Future[None] | None = None
        self._last_write = 0.0
        self._closing = False
        self.lost = asyncio.Event()

    # --- the connection ---

    def next_packet_id(self) -> int:
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.lost.clear()
        self._buffer.clear()
        self._acks.clear()  # owed on the old connection: the broker sends those again
        will = (self._health_topic, encode(Health(v=1, online=False, at=_now_ms())))
        self.transport.write(connect_packet(self.device_id, self.pool.url, will))
        self._last_write = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.connected
        self.connected = False
        self.transport = None
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError("connection lost before CONNACK"))
            self._connack.exception()  # retrieved: connect() may have timed out before it
        self.lost.set()
        if was:
            self.pool.connected_count -= 1

    def data_received(self, data: bytes) -> None:
        # Parsed in place, not through split_packets: most reads hold one whole packet,
        # and its generator, bytearray and body copies were a third of a receipt's cost.
        buffer = self._buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
            buffer.clear()
        out = self._acks
        owed = len(out)
        offset = 0
        size = len(data)
        while offset + 2 <= size:
            first = data[offset]
            length = data[offset + 1]
            if length < 0x80:
                pos = offset + 2
            else:
                decoded = decode_varint(data, offset + 1)
                if decoded is None:
                    break
                length, pos = decoded
            end = pos + length
            if end > size:
                break
            if first & 0xF0 == 0x30:
                self._on_publish(first, data, pos, end, out)
            else:
                self._on_control(first & 0xF0, data[pos:end])
            offset = end
        if offset < size:
            buffer += data[offset:]
        if len(out) >= ACKS_HELD:
            self.flush_acks()
        elif len(out) > owed and not owed:
            self.pool.hold_acks(self)

    def _on_control(self, kind: int, body: bytes) -> None:
        if kind == 0x40:
            if len(body) > 2 and body[2] >= 0x80:
                self.pool.refused_pubacks += 1
        elif kind == 0x20:
            self._on_connack(body)
        elif kind == 0xE0:
            log.warning("broker disconnected device", device=self.device_id,
                        reason=body[0] if len(body) else 0)  # fmt: skip

    def _on_connack(self, body: bytes) -> None:
        if self._connack is None or self._connack.done():
            return
        if len(body) < 2 or body[1] != 0:
            self._connack.set_exception(ConnectionError(f"CONNACK refused: {bytes(body[1:2])!r}"))
            return
        self._connack.set_result(None)

    def _on_publish(self, first: int, data: bytes, pos: int, end: int, out: list[bytes]) -> None:
        """The PUBLISH in ``data[pos:end]`` (its variable header and payload)."""
        if end - pos < 2:
            return  # malformed: no topic length
        topic_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
        topic = data[pos + 2 : topic_end]
        pos = topic_end
        if first & 0x06:
            if end - pos < 2:
                return
            out.append(b"\x40\x02" + data[pos : pos + 2])  # PUBACK: the packet id as it came
            pos += 2
        if pos >= end:
            return  # malformed: no property length
        props = data[pos]
        if props < 0x80:
            pos += 1
        else:
            try:
                decoded = decode_varint(data[:end], pos)
            except ValueError:
                decoded = None
            if decoded is None:
                return
            props, pos = decoded
        try:
            answer = _answer.decode(data[pos + props : end])
        except msgspec.DecodeError:
            return
        if answer.order_id is None:
            return
        if topic == self.receipts_topic:
            self.pool.on_receipt(self, answer.order_id, answer.result)
        elif topic == self.status_topic:
            self.pool.on_status(self, answer.order_id, answer.status, answer.at)

    async def connect(self) -> None:
        """One connection attempt up to CONNACK and SUBSCRIBE; raises on failure."""
        pool = self.pool
        pool.tracker.connect_attempt()
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.create_connection(lambda: self, pool.url.host, pool.url.port)
            try:
                await self._connack
            except BaseException:
                if self.transport is not None:
                    self.transport.abort()
                raise
        assert self.transport is not None
        topics = (names.receipts_topic(self.device_id), names.status_topic(self.device_id))
        self.write(subscribe_packet(self.next_packet_id(), topics))
        self.connected = True
        pool.connected_count += 1
        pool.tracker.connect_succeeded(self.device_id)
        self.publish_health(online=True)
        pool.resend_all(self)

    async def supervise(self) -> None:
        """Connect, and reconnect with jittered backoff for as long as the pool runs."""
        s = self.pool.settings
        wait = s.reconnect_min_s
        while not self._closing:
            try:
                async with self.pool.connecting:
                    await self.connect()
            except (OSError, TimeoutError, ConnectionError) as exc:
                log.debug("light device connect failed", device=self.device_id, error=repr(exc))
                await asyncio.sleep(random.uniform(0, wait))
                wait = min(s.reconnect_max_s, wait * 2)
                continue
            wait = s.reconnect_min_s
            await self.lost.wait()
            if not self._closing:
                await asyncio.sleep(random.uniform(0, s.reconnect_min_s))

    def write(self, data: bytes, now: float | None = None) -> None:
        if self.transport is not None:
            if self._acks:
                data = b"".join(self._acks) + data
                self._acks.clear()
            self.transport.write(data)
            self._last_write = time.monotonic() if now is None else now

    def flush_acks(self) -> None:
        """Send the PUBACKs owed now."""
        if self._acks:
            self.write(b"")

    def close(self) -> None:
        """Send DISCONNECT (so the broker keeps the Will to itself) and close."""
        self._closing = True
        if self.transport is not None:
            if self.connected:
                self.publish_health(online=False)
                self.write(DISCONNECT)
            self.transport.close()

    # --- what it publishes ---

    def publish(self, payload: bytes, now: float | None = None) -> None:
        self.write(publish_packet(self._orders_topic, self.next_packet_id(), payload), now)

    def publish_many(self, payloads: list[bytes], now: float) -> None:
        """Several orders in one write (resends come due together): one send, not one each."""
        topic = self._orders_topic
        self.write(b"".join(publish_packet(topic, self.next_packet_id(), p) for p in payloads), now)

    def publish_health(self, *, online: bool) -> None:
        health = Health(v=1, online=online, at=_now_ms(), outbox_depth=self.unreceipted)
        self.write(publish_packet(self._health_topic_raw, self.next_packet_id(), encode(health)))

    def query(self, order_ids: tuple[str, ...]) -> None:
        payload = encode(StatusQuery(v=1, order_ids=order_ids))
        self.write(publish_packet(self._query_topic, self.next_packet_id(), payload))

    def ping_if_idle(self, now: float) -> None:
        if self.connected and now - self._last_write > KEEPALIVE_S / 2:
            self.write(PINGREQ)

    async def submit(self, body: dict[str, Any]) -> None:
        """Place an order (the same call as a real agent's :class:`fleet.devices.SimDevice`)."""
        self.offer(body)

    def offer(self, body: dict[str, Any]) -> None:
        """Place an order: into the pool's outbox, and published now if connected."""
        self.pool.place(self, body)


@dataclass(frozen=True)
class LightSettings:
    """How the pool's devices connect and behave (the agent's settings of the same names)."""

    mqtt_url: str
    receipt_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 5.0
    status_query_delay_s: float = 3.0
    status_query_max_interval_s: float = 10.0
    health_interval_s: float = 30.0
    ack_delay_s: float = ACK_DELAY_S
    # Geo mode: the region every order names in ``attempts`` (None: no attempts).
    region: str | None = None


class LightPool:
    """The lightweight devices of one process, their shared outbox and its timers."""

    def __init__(self, settings: LightSettings, tracker: Tracker, device_ids: list[str]) -> None:
        self.settings = settings
        self.url = MqttUrl.parse(settings.mqtt_url)
        self.tracker = tracker
        self.devices = [LightDevice(self, d) for d in device_ids]
        self.unreceipted = 0
        self.connected_count = 0
        self.refused_pubacks = 0
        # (deadline, order, sent_at) in send order (one timeout for all: sorted), and
        # (due, order id, order) by due time; stale ones are skipped when they come up.
        self._resend: deque[tuple[float, _Pending, float]] = deque()
        self._queries: list[tuple[float, int, _Pending]] = []
        self._query_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []
        self.connecting = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        self._ticker: asyncio.Task[None] | None = None
        self._owing: set[LightDevice] = set()  # devices holding PUBACKs
        self._ack_timer: asyncio.TimerHandle | None = None
        self._items: dict[tuple[str, int, int], Item] = {}  # one Item per distinct line
        self._gc_before: tuple[int, int, int] | None = None
        self._attempts = () if settings.region is None else (settings.region,)

    async def start(self, ramp_per_s: float) -> None:
        """Start every device's connection, ``ramp_per_s`` a second (not waiting for them)."""
        self._ticker = asyncio.create_task(self._tick(), name="light-ticker")
        self._gc_before = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(max(GC_GEN0, self._gc_before[0]), *self._gc_before[1:])
        step = max(1, int(ramp_per_s / 10))
        for i, device in enumerate(self.devices):
            self._tasks.append(asyncio.create_task(device.supervise()))
            if (i + 1) % step == 0:
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Disconnect every device cleanly and stop the timers."""
        for device in self.devices:
            device.close()
        tasks = [*self._tasks, *([self._ticker] if self._ticker else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        if self._gc_before is not None:
            gc.set_threshold(*self._gc_before)
            gc.unfreeze()
            self._gc_before = None
        # Let the transports flush their DISCONNECT.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for device in self.devices:
                    if device.transport is not None:
                        await device.lost.wait()

    # --- the outbox ---

    def hold_acks(self, device: LightDevice) -> None:
        """``device`` owes PUBACKs: they leave with its next write or within ack_delay_s."""
        self._owing.add(device)
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(self.settings.ack_delay_s, self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_timer = None
        owing, self._owing = self._owing, set()
        for device in owing:
            device.flush_acks()

    def _item(self, line: dict[str, Any]) -> Item:
        key = (line["sku"], line["qty"], line["unit_price"])
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = Item(sku=key[0], qty=key[1], unit_price=key[2])
        return item

    def place(self, device: LightDevice, body: dict[str, Any]) -> None:
        device.seq += 1
        seq = device.seq
        order_id = f"o{seq:09d}"
        order = Order(
            v=1,
            order_id=order_id,
            device_id=device.device_id,
            seq=seq,
            created_at=_now_ms(),
            currency=body["currency"],
            items=tuple(map(self._item, body["items"])),
            total=body["total"],
            attempts=self._attempts,
        )  # fmt: skip
        payload = encode(order)
        ref = (device.device_id, order_id)
        entry = device.pending[order_id] = _Pending(device, order_id, payload)
        device.unreceipted += 1
        self.unreceipted += 1
        now = time.monotonic()
        self.tracker.placed(ref, now, device.orders_topic, payload)
        if device.connected:  # its first send (a later one is _send_many's)
            device.publish(payload, now)
            entry.sent_at = now
            self.tracker.published_at[ref] = now
            self._resend.append((now + self.settings.receipt_timeout_s, entry, now))

    def _send_many(self, device: LightDevice, entries: list[_Pending], now: float) -> None:
        """Publish ``entries`` (orders sent before) of ``device`` again, in one write."""
        device.publish_many([entry.payload for entry in entries], now)
        deadline = now + self.settings.receipt_timeout_s
        published = self.tracker.published_at
        for entry in entries:
            entry.sent_at = now
            published.setdefault((device.device_id, entry.order_id), now)
            self._resend.append((deadline, entry, now))

    def resend_all(self, device: LightDevice) -> None:
        """After a (re)connect: publish every order of ``device`` still without a receipt."""
        entries = [entry for entry in device.pending.values() if not entry.receipted]
        if entries:
            self._send_many(device, entries, time.monotonic())

    def on_receipt(self, device: LightDevice, order_id: str, result: str) -> None:
        ref = (device.device_id, order_id)
        self.tracker.receipt(ref, result)
        entry = device.pending.get(order_id)
        if entry is None or entry.receipted or result == "pending":
            return  # pending (geo mode): kept, and sent again when its timeout comes
        entry.receipted = True
        device.unreceipted -= 1
        self.unreceipted -= 1
        if result not in SETTLED or ref in self.tracker.terminal:
            # Rejected: settled for good, with nothing to ask (the agent holds it).
            del device.pending[order_id]
            return
        entry.query_wait = self.settings.status_query_delay_s
        entry.query_at = time.monotonic() + entry.query_wait
        heapq.heappush(self._queries, (entry.query_at, next(self._query_ids), entry))

    def on_status(self, device: LightDevice, order_id: str, status: str, at: int = 0) -> None:
        self.tracker.status((device.device_id, order_id), status, at or None)
        if status in TERMINAL:
            entry = device.pending.get(order_id)
            if entry is not None and entry.receipted:
                del device.pending[order_id]

    async def _tick(self) -> None:
        last_health = last_ping = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            self._resend_due(now)
            self._query_due(now)
            if now - last_ping > 1.0:
                last_ping = now
                for device in self.devices:
                    device.ping_if_idle(now)
            if self.settings.health_interval_s > 0 and (
                now - last_health > self.settings.health_interval_s
            ):
                last_health = now
                for device in self.devices:
                    if device.connected:
                        device.publish_health(online=True)

    def _resend_due(self, now: float) -> None:
        queue = self._resend
        due: dict[LightDevice, list[_Pending]] = {}
        while queue and queue[0][0] <= now:
            _, entry, sent_at = queue.popleft()
            if entry.receipted or entry.sent_at != sent_at:
                continue  # receipted, or sent again since
            if entry.device.connected:
                due.setdefault(entry.device, []).append(entry)
            # else: resend_all sends it when the device is back
        for device, entries in due.items():
            self._send_many(device, entries, now)

    def _query_due(self, now: float) -> None:
        queue = self._queries
        asks: dict[LightDevice, list[str]] = {}
        while queue and queue[0][0] <= now:
            at, _, entry = heapq.heappop(queue)
            if entry.query_at != at or entry.device.pending.get(entry.order_id) is not entry:
                continue  # its status came
            entry.query_wait = min(entry.query_wait * 2, self.settings.status_query_max_interval_s)
            entry.query_at = now + entry.query_wait
            heapq.heappush(queue, (entry.query_at, next(self._query_ids), entry))
            if entry.device.connected:
                asks.setdefault(entry.device, []).append(entry.order_id)
        for device, order_ids in asks.items():
            for i in range(0, len(order_ids), MAX_QUERIED_ORDERS):
                device.query(tuple(order_ids[i : i + MAX_QUERIED_ORDERS]))

    # --- figures ---

    def connected(self) -> int:
        return self.connected_count

    def outbox_depth(self) -> int:
        return self.unreceipted

    def flood(self) -> int:
        """Every connected device publishes each receipted order's payload again."""
        by_id = {d.device_id: d for d in self.devices}
        sent = 0
        for ref in list(self.tracker.receipted):
            device = by_id.get(ref[0])
            payload = self.tracker.payloads.get(ref)
            if device is not None and payload is not None and device.connected:
                device.publish(payload[1])
                sent += 1
        return sent


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
