"""Load for the benchmarks: lean raw-socket QoS 1 publishers and session pre-creation.

Each publisher process pre-encodes its MQTT 3.1.1 PUBLISH packets, then
writes them in chunks while keeping at most ``window`` unacknowledged, so the
publishers are never what limits a run.
"""

from __future__ import annotations

import multiprocessing as mp
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
from schemas.names import orders_topic

CHUNK = 100


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


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


def publish_load(
    host: str, port: int, total: int, processes: int, *, devices: int, rate: float = 0.0
) -> dict[int, list[float]]:
    """Publish ``total`` orders from ``processes`` processes (``rate`` msg/s in all, 0 = flat out).

    Returns when every publish was acked by the broker: the send time of each chunk.
    """
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    per = total // processes
    procs = [
        mp.Process(target=_publish, args=(host, port, p, per, devices, rate / processes, queue))
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
