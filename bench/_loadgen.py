"""Load for the benchmarks: lean raw-socket QoS 1 publishers and session pre-creation.

Each publisher process pre-encodes its MQTT 3.1.1 PUBLISH packets, then
writes them in chunks while keeping at most ``window`` unacknowledged, so the
publishers are never what limits a run.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import socket
import struct
import threading
import time
import uuid

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas import Item, Order, encode
from schemas.names import TRACEPARENT_PROPERTY, orders_topic
from servicekit.mqtt_varint import decode_varint, encode_varint

CHUNK = 100


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + encode_varint(len(body)) + body


def bench_order(proc: int, index: int, devices: int) -> tuple[str, bytes]:
    """A ~200-byte valid order of device ``index % devices`` of publisher ``proc``."""
    device = f"bench-{proc}-{index % devices}"
    item = Item(sku="sku-cola-330ml", qty=2, unit_price=150)
    order = Order(
        v=1,
        order_id=f"o{proc:02d}x{index:09d}",
        device_id=device,
        seq=index,
        created_at=1_760_000_000_000 + index,
        currency="EUR",
        items=(item,),
        total=300,
        attrs={"store": "central-station-7", "lane": "north"},
    )
    return orders_topic(device), encode(order)


def _publish(  # noqa: PLR0917 - a multiprocessing target takes its args positionally
    host: str,
    port: int,
    proc: int,
    count: int,
    devices: int,
    rate: float,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    packets = []
    for index in range(count):
        topic, payload = bench_order(proc, index, devices)
        encoded_topic = topic.encode()
        body = struct.pack("!H", len(encoded_topic)) + encoded_topic
        body += struct.pack("!H", index % 65535 + 1) + payload
        packets.append(_packet(0x32, body))
    client_id = f"lg-{proc}-{uuid.uuid4().hex[:6]}".encode()
    connect = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(client_id)) + client_id
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_packet(0x10, connect))
    assert sock.recv(4)[:1] == b"\x20"
    chunk_times: list[float] = []
    sent = acked = 0
    window = 2000
    pending = b""
    started = time.monotonic()
    while acked < count:
        while sent < count and sent - acked < window:
            if rate > 0:  # paced: chunk k leaves at k * CHUNK / rate
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            chunk_times.append(time.time())
            sock.sendall(b"".join(packets[sent : sent + CHUNK]))
            sent = min(count, sent + CHUNK)
        data = pending + sock.recv(1 << 16)
        whole = len(data) // 4 * 4
        acked += whole // 4
        pending = data[whole:]
    sock.sendall(b"\xe0\x00")
    sock.close()
    out.put((proc, chunk_times))


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _publish5(  # noqa: PLR0917 - a multiprocessing target takes its args positionally
    host: str,
    port: int,
    proc: int,
    count: int,
    devices: int,
    trace_ratio: float | None,
    out: mp.Queue,  # type: ignore[type-arg]
) -> None:
    """Like :func:`_publish`, over MQTT 5: with a sampled ``traceparent`` user property on a
    share ``trace_ratio`` of the orders and none on the rest, as agents send them (an
    unsampled trace is not carried: servicekit.tracing), or without properties (``None``)."""
    rng = random.Random(proc)
    packets = []
    for index in range(count):
        topic, payload = bench_order(proc, index, devices)
        properties = b""
        if trace_ratio is not None and rng.random() < trace_ratio:
            traceparent = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
            properties = b"\x26" + _utf8(TRACEPARENT_PROPERTY) + _utf8(traceparent)
        body = _utf8(topic) + struct.pack("!H", index % 65535 + 1)
        packets.append(_packet(0x32, body + encode_varint(len(properties)) + properties + payload))
    client_id = f"lg5-{proc}-{uuid.uuid4().hex[:6]}".encode()
    connect = b"\x00\x04MQTT\x05\x02\x00\x3c\x00" + struct.pack("!H", len(client_id)) + client_id
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_packet(0x10, connect))
    sent = acked = 0
    window = 2000
    buffer = b""
    connected = False
    while acked < count:
        while connected and sent < count and sent - acked < window:
            sock.sendall(b"".join(packets[sent : sent + CHUNK]))
            sent = min(count, sent + CHUNK)
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError(f"broker closed publisher {proc} at {acked} of {count} acks")
        kinds, buffer = _split_packets(buffer + data)
        connected = connected or 0x20 in kinds
        acked += kinds.count(0x40)
    sock.sendall(b"\xe0\x00")
    sock.close()
    out.put((proc, []))


def _split_packets(data: bytes) -> tuple[list[int], bytes]:
    """The packet types of the whole MQTT packets in ``data``, and the rest."""
    kinds = []
    offset = 0
    while offset + 2 <= len(data):
        decoded = decode_varint(data, offset + 1)
        if decoded is None:
            break
        length, pos = decoded
        if pos + length > len(data):
            break
        kinds.append(data[offset] & 0xF0)
        offset = pos + length
    return kinds, data[offset:]


def publish_load(
    host: str,
    port: int,
    total: int,
    processes: int,
    *,
    devices: int,
    rate: float = 0.0,
    mqtt5_trace_ratio: float | bool | None = False,
) -> dict[int, list[float]]:
    """Publish ``total`` orders from ``processes`` processes (``rate`` msg/s in all, 0 = flat out).

    ``mqtt5_trace_ratio``: False publishes over MQTT 3.1.1; None over MQTT 5 without
    properties; a ratio over MQTT 5 with a sampled ``traceparent`` user property on that
    share of the orders (``rate`` is ignored then).
    Returns when every publish was acked by the broker: the send time of each chunk.
    """
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    per = total // processes
    procs = [
        mp.Process(target=_publish, args=(host, port, p, per, devices, rate / processes, queue))
        if mqtt5_trace_ratio is False
        else mp.Process(
            target=_publish5, args=(host, port, p, per, devices, mqtt5_trace_ratio, queue)
        )
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    results = dict(queue.get() for _ in procs)
    for proc in procs:
        proc.join()
    return results


def send_time(chunks: dict[int, list[float]], order_id: str) -> float:
    """When the chunk holding ``order_id`` was written by its publisher."""
    proc, index = int(order_id[1:3]), int(order_id[4:])
    return chunks[proc][index // CHUNK]


def drop_session(host: str, port: int, client_id: str) -> None:
    """Connect with a clean start and no expiry, so the broker forgets the session."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(host, port, clean_start=True, properties=props)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"no CONNACK for {client_id}")
    client.disconnect()
    client.loop_stop()


def create_session(host: str, port: int, client_id: str, subscription: str) -> None:
    """Subscribe once with a persistent session, then leave, so the broker queues for it."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    client.connect(host, port, clean_start=True, properties=props)
    client.loop_start()
    client.subscribe(subscription, qos=1)
    if not subscribed.wait(10):
        raise RuntimeError(f"no SUBACK for {client_id}")
    client.disconnect()
    client.loop_stop()
