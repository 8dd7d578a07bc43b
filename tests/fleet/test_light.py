"""Lightweight devices (fleet.light): their wire behaviour, and a run mixing them with real agents.

``LOADGEN_SLOW=1`` adds a run at a production rate (thousands of orders a
second) that must verify clean and keep the simulator under its CPU budget.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import msgspec
import pytest
import redis.asyncio as aioredis

from fleet.light import (
    LightDevice,
    LightPool,
    LightSettings,
    puback,
    publish_packet,
    split_packets,
)
from fleet.loops import runner
from fleet.sim import SimOptions, run
from fleet.stack import Stack, StackSettings
from fleet.tracker import Tracker
from fleet.verify import count_stream_entries
from fleet.workers import split_total
from schemas import Health, Status, encode, names
from testrig.servers import MosquittoProcess

from .mqtt_probe import Probe


def test_split_packets_returns_whole_packets_and_keeps_the_rest() -> None:
    one = publish_packet(b"\x00\x01t", 7, b"x" * 300)  # a two-byte remaining length
    data = bytearray(one + puback(9) + one[:5])
    packets = list(split_packets(data))
    assert [first for first, _ in packets] == [0x32, 0x40]
    assert packets[1][1] == b"\x00\x09"
    assert len(packets[0][1]) == len(one) - 3
    assert data == one[:5]  # the partial packet waits for the rest


class _Answers(LightPool):
    """Records the receipts and statuses its devices parse."""

    answers: list[tuple[str, str]]

    def on_receipt(self, device: LightDevice, order_id: str, result: str) -> None:
        self.answers.append((order_id, result))

    def on_status(self, device: LightDevice, order_id: str, status: str, at: int = 0) -> None:
        self.answers.append((order_id, status))


def _prefixed(topic: bytes) -> bytes:
    return len(topic).to_bytes(2, "big") + topic


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
async def test_a_device_parses_packets_however_the_reads_cut_them(chunk: int) -> None:
    """Receipts, statuses (one with a two-byte remaining length) and a PUBACK, fed in
    reads of ``chunk`` bytes: every answer heard once, a PUBACK owed per delivery."""
    pool = _Answers(LightSettings("mqtt://127.0.0.1:1"), Tracker(), ["lt-parse"])
    pool.answers = []
    light = pool.devices[0]
    receipt = msgspec.msgpack.encode({"v": 1, "order_id": "o1", "result": "accepted"})
    status = msgspec.msgpack.encode({"v": 1, "order_id": "o2", "status": "fulfilled",
                                     "reason": "x" * 200})  # fmt: skip
    second = publish_packet(_prefixed(light.status_topic), 258, status)
    assert second[1] & 0x80  # its remaining length takes two bytes
    stream = publish_packet(_prefixed(light.receipts_topic), 7, receipt) + puback(3) + second
    for i in range(0, len(stream), chunk):
        light.data_received(stream[i : i + chunk])
    assert pool.answers == [("o1", "accepted"), ("o2", "fulfilled")]
    assert light._acks == [puback(7), puback(258)]
    assert not light._buffer
    pool._flush_acks()  # no transport: nothing is written, the timer is gone


def test_a_process_of_light_devices_only_runs_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    assert issubclass(runner(light_only=True)(loop_type()), uvloop.Loop)
    assert not issubclass(runner(light_only=False)(loop_type()), uvloop.Loop)


def test_light_devices_are_split_over_workers_in_proportion() -> None:
    assert split_total(10, [5, 5]) == [5, 5]
    assert sum(split_total(3, [4, 4])) == 3
    assert split_total(8, [4, 4]) == [4, 4]
    assert split_total(0, [4, 4]) == [0, 0]
    shares = split_total(7, [3, 3, 3])
    assert sum(shares) == 7
    assert all(s <= 3 for s in shares)


async def test_will_is_published_when_a_device_vanishes(mosquitto: MosquittoProcess) -> None:
    """Health online on connect; the broker publishes the Will (online=False) on an abort."""
    device = f"lt-will-{time.monotonic_ns()}"
    with Probe(mosquitto.port) as probe:
        probe.subscribe(names.health_topic(device))
        pool = LightPool(LightSettings(mosquitto.url), Tracker(), [device])
        await pool.start(ramp_per_s=100)
        try:
            first = await asyncio.to_thread(probe.wait_messages, 1)
            assert msgspec.msgpack.decode(first[0].payload, type=Health).online
            light = pool.devices[0]
            assert light.transport is not None
            light.transport.abort()  # no DISCONNECT: the broker must send the Will
            both = await asyncio.to_thread(probe.wait_messages, 2)
            assert not msgspec.msgpack.decode(both[1].payload, type=Health).online
        finally:
            await pool.close()


class _HeardPool(LightPool):
    """Counts the statuses each order id was delivered with."""

    heard: dict[str, int]
    changed: asyncio.Event

    def on_status(self, device: LightDevice, order_id: str, status: str, at: int = 0) -> None:
        self.heard[order_id] = self.heard.get(order_id, 0) + 1
        self.changed.set()
        super().on_status(device, order_id, status, at)

    async def until_heard(self, order_id: str, times: int) -> None:
        async with asyncio.timeout(5):
            while self.heard.get(order_id, 0) < times:
                self.changed.clear()
                await self.changed.wait()


ACK_DELAY_S = 0.1  # shorter than the default (1 s), for a quick test


async def test_owed_pubacks_leave_within_the_delay(mosquitto: MosquittoProcess) -> None:
    """A PUBACK is held for a moment, then sent: after a reconnect the broker delivers
    again only the message whose PUBACK had not left yet (clean start off)."""
    device = f"lt-ack-{time.monotonic_ns()}"
    pool = _HeardPool(LightSettings(mosquitto.url, ack_delay_s=ACK_DELAY_S), Tracker(), [device])
    pool.heard, pool.changed = {}, asyncio.Event()
    light = pool.devices[0]

    def status(order_id: str) -> bytes:
        return encode(Status(v=1, order_id=order_id, status="fulfilled", reason=None, at=1))

    with Probe(mosquitto.port) as probe:
        probe.subscribe(names.health_topic(device))
        await pool.start(ramp_per_s=100)
        try:
            await asyncio.to_thread(probe.wait_messages, 1)  # online: subscribed too
            topic = names.status_topic(device)
            await asyncio.to_thread(probe.publish, topic, status("o-acked"))
            await pool.until_heard("o-acked", 1)
            await asyncio.sleep(ACK_DELAY_S * 3)  # its PUBACK has left
            await asyncio.to_thread(probe.publish, topic, status("o-owed"))
            await pool.until_heard("o-owed", 1)
            assert light.transport is not None
            light.transport.abort()  # at once: this one's PUBACK is still owed
            await pool.until_heard("o-owed", 2)  # delivered again on the reconnect
            await asyncio.sleep(ACK_DELAY_S * 3)
            assert pool.heard == {"o-acked": 1, "o-owed": 2}
        finally:
            await pool.close()


async def test_orders_without_a_receipt_are_sent_again_in_one_write(
    mosquitto: MosquittoProcess,
) -> None:
    """No bridge, so no receipt: after the timeout a device's due orders leave together."""
    device = f"lt-resend-{time.monotonic_ns()}"
    pool = LightPool(LightSettings(mosquitto.url, receipt_timeout_s=0.3), Tracker(), [device])
    light = pool.devices[0]
    writes: list[bytes] = []
    write = light.write

    def recording(data: bytes, now: float | None = None) -> None:
        if light._orders_topic in data:
            writes.append(data)
        write(data, now)

    light.write = recording  # type: ignore[method-assign]
    body = {"currency": "EUR", "items": [{"sku": "s", "qty": 1, "unit_price": 5}], "total": 5}
    with Probe(mosquitto.port) as probe:
        probe.subscribe(names.health_topic(device))
        await pool.start(ramp_per_s=100)
        try:
            await asyncio.to_thread(probe.wait_messages, 1)  # online: connected
            for _ in range(3):
                light.offer(body)
            # The timer's pass, once all three are due (in the same turn, so its own ticks
            # cannot split them: a tick between their deadlines would, by microseconds).
            pool._resend_due(time.monotonic() + 0.3)
            assert [len(list(split_packets(bytearray(w)))) for w in writes] == [1, 1, 1, 3]
            assert pool.outbox_depth() == 3  # still unreceipted: sent again at the next timeout
            assert light.connected  # sent on the live connection, not by a reconnect
        finally:
            await pool.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack"), StackSettings(shards=4)) as running:
        yield running


async def test_mixed_fleet_survives_a_broker_restart(stack: Stack) -> None:
    """Real agents and light devices in one run; the broker dies mid-load; all verified."""
    prefix = f"mix{time.monotonic_ns() % 10**8}"
    options = SimOptions(
        devices=60, light_devices=40, rate=60, duration_s=7, shards=4, prefix=prefix,
        chaos="3:broker-restart", settle_timeout_s=90, receipt_timeout_s=4.0,
        loop_lag_interval_s=0.01,
    )  # fmt: skip
    before = stack.broker.pid
    result = await run(options, stack)
    v = result.verdict
    assert stack.broker.pid != before
    assert result.settled
    assert (v.lost, v.duplicated, v.stuck, v.unheard, v.processed_twice) == ([], {}, [], [], {})
    # Every device connected again after the kill (counted from CONNACKs: the 1 s sampler's
    # connected count misses an outage shorter than a second, 4 of 7 runs on a busy machine).
    (restart,) = result.chaos.broker_restarts
    assert restart.connected_before == restart.back == options.devices
    assert result.record.samples[-1].submitted == v.checked > 200
    async with aioredis.from_url(stack.redis_url) as redis:
        counts = await count_stream_entries(redis, 4)
    numbers = {int(device.rsplit("-", 1)[1]) for device, _ in counts if device.startswith(prefix)}
    assert any(n < 20 for n in numbers)  # real agents (the first 20) placed orders
    assert any(n >= 20 for n in numbers)  # and so did the light devices
    cpu = result.record.cpu
    assert cpu is not None
    assert cpu.generator_s > 0
    assert set(cpu.cloud_s) == {"broker", "redis", "bridge", "pipeline"}
    # The loop-lag ticker ran from the load's start to its end (a settle that finds
    # everything settled may end within the last tick, so not "past the load").
    lag_t = [tick.t for tick in result.record.loop_lag]
    assert lag_t[0] < 1.0 < options.duration_s - 1.0 < lag_t[-1]
    assert all(tick.late_ms >= 0 and tick.cpu_ms >= 0 for tick in result.record.loop_lag)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LOADGEN_SLOW"), reason="set LOADGEN_SLOW=1 (about 90 s)")
async def test_light_devices_at_a_production_rate(stack: Stack) -> None:
    """Thousands of orders a second from light devices verify clean; report the costs."""
    rate = float(os.environ.get("LOADGEN_RATE", "5000"))
    options = SimOptions(
        devices=500, light_devices=500, rate=rate, duration_s=20, shards=4,
        settle_timeout_s=300, status_wait_s=120, status_query_delay_s=30,
    )  # fmt: skip
    result = await run(options, stack)
    v = result.verdict
    assert (v.lost, v.duplicated, v.stuck, v.unheard, v.processed_twice) == ([], {}, [], [], {})
    cpu = result.record.cpu_load
    assert cpu is not None
    per_order = cpu.per_order_us(cpu.generator_s, v.checked)
    print(f"simulator {per_order:.0f} µs/order during the load")
    assert per_order <= 50 * 2  # the goal is 50; a shared machine gets twice the slack
