"""Locust with MQTT devices as users: the evaluation of Locust's distributed mode (issue 26).

Not a test, and not part of fleet-sim: a locustfile. Each Locust user is one
device with its own MQTT 5 connection (the packets of :mod:`fleet.light`, on
a gevent-patched blocking socket): QoS 1 orders at ``LOADGEN_USER_RATE``
orders/s, resent until a receipt, a PUBACK for every receipt and status.
Receipt and terminal-status latencies go to Locust's stats as requests
``mqtt receipt`` and ``mqtt status`` (so its charts, CSV and the master's
aggregation show them).

The verifier runs once, on the master: every worker settles its devices when
the master asks (a Locust custom message, on the master's ``test_stop``):
it stops placing orders, waits for its devices' receipts and statuses (or
``LOADGEN_SETTLE_S``) and sends the orders they accepted and heard back; the
master waits for every worker, then runs
:func:`fleet.verify.verify` over the union against ``LOADGEN_REDIS_URL`` and
sets the exit code (0: nothing lost, duplicated, stuck or unheard).

    locust -f bench/locust_devices.py --master --headless --expect-workers 2 \\
        -u 100 -r 50 -t 20s --host mqtt://127.0.0.1:1883
    locust -f bench/locust_devices.py --worker     # twice
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
import uuid
from typing import Any

import gevent
import gevent.event
import msgspec
import redis.asyncio as aioredis
from locust import User, constant_throughput, events, task
from locust.runners import MasterRunner, WorkerRunner

from fleet.devices import Catalog
from fleet.light import (
    PINGREQ,
    _Answer,
    _utf8,
    connect_packet,
    puback,
    publish_packet,
    split_packets,
    subscribe_packet,
)
from fleet.stack import DEMO_CATALOG
from fleet.statuses import order_statuses
from fleet.tracker import TERMINAL
from fleet.verify import verify
from schemas import Health, Item, Order, encode, names
from servicekit.urls import MqttUrl

USER_RATE = float(os.environ.get("LOADGEN_USER_RATE", "5"))
RECEIPT_TIMEOUT_S = float(os.environ.get("LOADGEN_RECEIPT_TIMEOUT_S", "10"))
SETTLE_S = float(os.environ.get("LOADGEN_SETTLE_S", "60"))
REDIS_URL = os.environ.get("LOADGEN_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARDS = int(os.environ.get("LOADGEN_SHARDS", "4"))
RUN = os.environ.get("LOADGEN_RUN", uuid.uuid4().hex[:6])
_answer = msgspec.msgpack.Decoder(_Answer)
_catalog = Catalog.load(DEMO_CATALOG)

# Per process: every device's accepted orders, and those it heard the end of.
accepted: list[tuple[str, str]] = []
heard: set[tuple[str, str]] = set()
_users = 0
_devices: list[MqttDevice] = []
_stopping = False  # the master asked for the report: no new orders


class MqttDevice(User):
    """One device: its connection, its outbox, and a reader greenlet."""

    wait_time = constant_throughput(USER_RATE)

    def on_start(self) -> None:
        global _users  # noqa: PLW0603 - one counter per worker process
        _users += 1
        self.device_id = f"lc{RUN}-{os.getpid()}-{_users:05d}"
        _devices.append(self)
        self.rng = random.Random(self.device_id)
        self.seq = 0
        self.packet_id = 0
        self.pending: dict[str, tuple[bytes, float]] = {}  # order id → payload, sent at
        self.sent_at: dict[str, float] = {}
        self.awaiting: set[str] = set()  # receipted, no terminal status yet
        url = MqttUrl.parse(self.host or "mqtt://127.0.0.1:1883")
        self.topic = _utf8(names.orders_topic(self.device_id))
        self.receipts = names.receipts_topic(self.device_id).encode()
        self.status = names.status_topic(self.device_id).encode()
        self.sock = socket.create_connection((url.host, url.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        will = (names.health_topic(self.device_id), encode(Health(v=1, online=False, at=_ms())))
        self.sock.sendall(connect_packet(self.device_id, url, will))
        self.connected = gevent.event.Event()
        self.reader = gevent.spawn(self._read)
        self.connected.wait(10)
        topics = (names.receipts_topic(self.device_id), names.status_topic(self.device_id))
        self.sock.sendall(subscribe_packet(self._next_id(), topics))
        self.resender = gevent.spawn(self._resend)

    def on_stop(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while (self.pending or self.awaiting) and time.monotonic() < deadline:
            gevent.sleep(0.2)
        self.resender.kill()
        self.reader.kill()
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()

    def _next_id(self) -> int:
        self.packet_id = self.packet_id % 65535 + 1
        return self.packet_id

    @task
    def order(self) -> None:
        if _stopping:
            return
        body = _catalog.order_body(self.rng)
        self.seq += 1
        order_id = f"o{self.seq:09d}"
        items = tuple(Item(sku=i["sku"], qty=i["qty"], unit_price=i["unit_price"])
                      for i in body["items"])  # fmt: skip
        payload = encode(Order(v=1, order_id=order_id, device_id=self.device_id, seq=self.seq,
                               created_at=_ms(), currency=body["currency"], items=items,
                               total=body["total"]))  # fmt: skip
        now = time.monotonic()
        self.pending[order_id] = (payload, now)
        self.sent_at[order_id] = now
        accepted.append((self.device_id, order_id))
        self.sock.sendall(publish_packet(self.topic, self._next_id(), payload))

    def _resend(self) -> None:
        while True:
            gevent.sleep(1.0)
            now = time.monotonic()
            for order_id, (payload, at) in list(self.pending.items()):
                if now - at > RECEIPT_TIMEOUT_S:
                    self.pending[order_id] = (payload, now)
                    self.sock.sendall(publish_packet(self.topic, self._next_id(), payload))
            if now - self.sent_at.get(max(self.sent_at, default=""), now) > 15:
                self.sock.sendall(PINGREQ)

    def _read(self) -> None:
        buffer = bytearray()
        while data := self.sock.recv(65536):
            buffer += data
            acks: list[bytes] = []
            for first, body in split_packets(buffer):
                kind = first & 0xF0
                if kind == 0x20:
                    self.connected.set()
                elif kind == 0x30:
                    self._on_publish(first, body, acks)
            if acks:
                self.sock.sendall(b"".join(acks))

    def _on_publish(self, first: int, body: bytes, acks: list[bytes]) -> None:
        (topic_len,) = struct.unpack_from("!H", body, 0)
        pos = 2 + topic_len
        topic = body[2:pos]
        if first & 0x06:
            acks.append(puback(struct.unpack_from("!H", body, pos)[0]))
            pos += 2
        props = body[pos]  # short property blocks only (< 128 bytes)
        answer = _answer.decode(body[pos + 1 + props :])
        order_id = answer.order_id
        if order_id is None or order_id not in self.sent_at:
            return
        ms = (time.monotonic() - self.sent_at[order_id]) * 1000
        if topic == self.receipts and answer.result in ("accepted", "duplicate"):
            if self.pending.pop(order_id, None) is not None:
                self.awaiting.add(order_id)
                _fire("receipt", ms)
        elif topic == self.status and answer.status in TERMINAL:
            ref = (self.device_id, order_id)
            if ref not in heard:
                heard.add(ref)
                self.awaiting.discard(order_id)
                _fire("status", ms)


def _fire(name: str, ms: float) -> None:
    events.request.fire(request_type="mqtt", name=name, response_time=ms, response_length=0,
                        exception=None, context={})  # fmt: skip


def _ms() -> int:
    return time.time_ns() // 1_000_000


# --- one verification over all workers' devices, on the master ---

_reports: dict[str, dict[str, Any]] = {}


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    # libev caches the loop's time: after this module's imports (seconds on a busy
    # machine) the run-time limit would fire at once.
    gevent.get_hub().loop.update_now()
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message("accepted", lambda msg, **_: _reports.__setitem__(
            msg.node_id, msg.data))  # fmt: skip
    if isinstance(runner, WorkerRunner):
        runner.register_message("report", lambda msg, **_: gevent.spawn(_report, runner))


def _report(runner: Any) -> None:
    """Stop placing orders, settle this worker's devices, send what they accepted."""
    global _stopping  # noqa: PLW0603 - one flag per worker process
    _stopping = True
    deadline = time.monotonic() + SETTLE_S
    while any(d.pending or d.awaiting for d in _devices) and time.monotonic() < deadline:
        gevent.sleep(0.2)
    runner.send_message("accepted", {"accepted": accepted, "heard": list(heard)})


@events.test_stop.add_listener
def _verify(environment: Any, **_: Any) -> None:
    # On test_stop, not quitting: the master's message listener still runs here. In
    # a headless run the master stops before it tells the workers, so it asks them.
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        return
    runner.send_message("report", None)
    expected = int(os.environ.get("LOADGEN_WORKERS", "0")) or len(runner.clients) or 1
    deadline = time.monotonic() + SETTLE_S + 30
    while len(_reports) < expected and time.monotonic() < deadline:
        gevent.sleep(0.2)
    refs = [(str(d), str(o)) for data in _reports.values() for d, o in data["accepted"]]
    heard_all = {(str(d), str(o)) for data in _reports.values() for d, o in data["heard"]}
    verdict = asyncio.run(_run_verify(refs, heard_all))
    ok = verdict.ok and len(_reports) >= expected
    print(
        f"verification over {len(_reports)} workers: {verdict.checked:,} accepted orders, "
        f"{len(verdict.lost)} lost, {len(verdict.duplicated)} duplicated, "
        f"{len(verdict.stuck)} stuck, {len(verdict.unheard)} unheard -> "
        f"{'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    environment.process_exit_code = 0 if ok else 1


async def _run_verify(refs: list[tuple[str, str]], heard_all: set[tuple[str, str]]) -> Any:
    client = aioredis.from_url(REDIS_URL)
    try:
        return await verify(client, refs, shards=SHARDS, heard=heard_all,
                            statuses=lambda r: order_statuses(client, r, SHARDS))  # fmt: skip
    finally:
        await client.aclose()
