"""The light devices' CPU per order against a scripted cloud: the simulator's cost alone.

Not a test. ``bench/fleet_scale.py --light`` measures the simulator beside the
real stack, where its CPU per order follows how far the cloud is behind (a
late cloud's receipts and statuses share reads; a quick one's each cost a
wakeup), so on a shared machine one lever's effect drowns in the run-to-run
spread. Here one Mosquitto and a scripted cloud in another process answer
every order the same way: a receipt ``accepted`` within 5 ms (answers leave
in one write per 5 ms tick), then ``confirmed`` and ``fulfilled`` 15–20 ms
later, QoS 1, on the device's topics, as the bridge and the pipeline do. The
devices are :class:`fleet.light.LightPool`'s, with Poisson orders as
fleet-sim places them, on the loop fleet-sim gives them
(:func:`fleet.loops.runner`); the figure is the CPU of the loop's thread
over the load, and over load + the wait for the last statuses, per order.

.venv/bin/python -m bench.light_cpu [--rate 1250] [--seconds 10] [--devices 500]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import msgspec

from fleet.devices import Catalog
from fleet.light import LightPool, LightSettings, connect_packet, publish_packet, subscribe_packet
from fleet.loops import runner
from fleet.tracker import Tracker
from schemas import Receipt, Status, encode, names
from servicekit.mqtt_varint import decode_varint
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess

TICK_S = 0.005
STATUS_TICKS = 4  # statuses leave this many ticks after the receipt
MIN_SLEEP_S = 0.001  # as fleet.load places orders


class _OrderId(msgspec.Struct):
    order_id: str


_order_id = msgspec.msgpack.Decoder(_OrderId)


def _topic(topic: str) -> bytes:
    raw = topic.encode()
    return len(raw).to_bytes(2, "big") + raw


class _Cloud(asyncio.Protocol):
    """Subscribed to every device's orders: PUBACKs them, notes (device, order id)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.orders: list[tuple[str, str]] = []
        self.packet_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's do not subclass it

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        acks: list[bytes] = []
        while len(self.buffer) >= 2 and (header := decode_varint(self.buffer, 1)) is not None:
            length, pos = header
            if pos + length > len(self.buffer):
                break
            first, body = self.buffer[0], bytes(self.buffer[pos : pos + length])
            del self.buffer[: pos + length]
            if first & 0xF0 != 0x30:
                continue  # CONNACK, SUBACK, the broker's PUBACKs
            end = 2 + (body[0] << 8 | body[1])
            acks.append(b"\x40\x02" + body[end : end + 2])
            device = body[2:end].decode().split("/")[2]
            self.orders.append((device, _order_id.decode(body[end + 3 :]).order_id))
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def publish(self, topic: str, payload: bytes) -> bytes:
        self.packet_id = self.packet_id % 65535 + 1
        return publish_packet(_topic(topic), self.packet_id, payload)


async def _serve_cloud(url: str, ready: Event) -> None:
    loop = asyncio.get_running_loop()
    parsed = MqttUrl.parse(url)
    _, cloud = await loop.create_connection(_Cloud, parsed.host, parsed.port)
    assert cloud.transport is not None
    cloud.transport.write(connect_packet("bench-light-cloud", parsed, ("bench/will", b"")))
    await asyncio.sleep(0.2)
    cloud.transport.write(subscribe_packet(1, (names.orders_topic("+"),)))
    await asyncio.sleep(0.3)
    ready.set()
    later: list[list[tuple[str, str]]] = []
    while True:
        await asyncio.sleep(TICK_S)
        now = time.time_ns() // 1_000_000
        out = [
            cloud.publish(names.receipts_topic(device), encode(
                Receipt(v=1, order_id=order_id, result="accepted", reason=None, at=now)))
            for device, order_id in cloud.orders
        ]  # fmt: skip
        later.append(cloud.orders)
        cloud.orders = []
        if len(later) > STATUS_TICKS:
            for device, order_id in later.pop(0):
                for status in ("confirmed", "fulfilled"):
                    answer = Status(v=1, order_id=order_id, status=status, reason=None, at=now)
                    out.append(cloud.publish(names.status_topic(device), encode(answer)))
        if out:
            cloud.transport.write(b"".join(out))


def _cloud_main(url: str, ready: Event) -> None:
    runner(light_only=True)(_serve_cloud(url, ready))


def _loop_thread_cpu_s() -> float:
    pid = os.getpid()
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(url: str, rate: float, seconds: float, devices: int) -> None:
    tracker = Tracker()
    settings = LightSettings(url, receipt_timeout_s=30, status_query_delay_s=30)
    pool = LightPool(settings, tracker, [f"bench-light-{i:05d}" for i in range(devices)])
    await pool.start(ramp_per_s=2_000)
    try:
        while pool.connected() < devices:  # noqa: ASYNC110 - the pool has no event for it
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        catalog = Catalog({f"SKU-{i:03d}": 100 + i for i in range(50)}, "EUR")
        rng = random.Random(7)
        cpu0 = _loop_thread_cpu_s()
        started = next_at = time.monotonic()
        end = started + seconds
        placed = 0
        while (next_at := next_at + rng.expovariate(rate)) < end:
            if (delay := next_at - time.monotonic()) > MIN_SLEEP_S:
                await asyncio.sleep(delay)
            rng.choice(pool.devices).offer(catalog.order_body(rng))
            placed += 1
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        cpu_load = _loop_thread_cpu_s() - cpu0
        while len(tracker.terminal) < placed and time.monotonic() < end + 30:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # as fleet.load.await_heard polls
        cpu_all = _loop_thread_cpu_s() - cpu0
    finally:
        await pool.close()
    receipts = sorted(tracker.receipt_latency_ms)
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"{placed} orders at {rate:.0f}/s over {devices} light devices ({loop}), "
          f"{len(tracker.terminal)} heard terminal; receipt p50 "
          f"{receipts[len(receipts) // 2] if receipts else 0:.1f} ms; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"simulator CPU per order: {cpu_load / placed * 1e6:.1f} µs during the load, "
          f"{cpu_all / placed * 1e6:.1f} µs over load + settle")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1250.0, help="orders/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--devices", type=int, default=500)
    args = parser.parse_args()
    limits = "max_inflight_messages 1000\nmax_queued_messages 1000000\nset_tcp_nodelay true\n"
    with (
        tempfile.TemporaryDirectory() as tmp,
        MosquittoProcess(Path(tmp), extra_conf=limits) as broker,
    ):
        spawn = mp.get_context("spawn")
        ready = spawn.Event()
        cloud = spawn.Process(target=_cloud_main, args=(broker.url, ready), daemon=True)
        cloud.start()
        try:
            if not ready.wait(60):
                raise SystemExit("the scripted cloud did not subscribe within 60 s")
            runner(light_only=True)(_drive(broker.url, args.rate, args.seconds, args.devices))
        finally:
            cloud.terminate()
            cloud.join()


if __name__ == "__main__":
    main()
