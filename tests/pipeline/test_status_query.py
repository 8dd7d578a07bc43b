"""Status recovery end to end: a worker process answers status queries from Redis records."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from pipeline.config import PipelineConfig
from schemas import StatusQuery, encode
from schemas.names import status_query_topic
from servicekit.mqtt import MqttClient
from servicekit.urls import MqttUrl
from testrig.servers import MosquittoProcess
from tests.helpers import make_order, wait_until

from .conftest import StatusListener
from .processes import env_for, spawn, stop_all
from .producer import produce


@pytest.mark.usefixtures("catalog")
async def test_a_status_query_gets_the_current_status_again(
    aredis: aioredis.Redis,
    config: PipelineConfig,
    status_listener: StatusListener,
    device_id: str,
    tmp_path: Path,
) -> None:
    """An order is processed to `fulfilled`; a query for it brings that Status again. Unknown
    ids, another device's order and an undecodable query bring nothing and crash nothing."""
    other_device = f"{device_id}-other"
    status_listener.subscribe(device_id)
    status_listener.subscribe(other_device)
    log = tmp_path / "worker.log"
    worker = spawn(["worker"], env_for(config, log_level="info"), log)
    try:
        order = make_order(device_id, 0)
        await produce(aredis, order, config.shards)

        async def fulfilled() -> bool:
            return status_listener.statuses(order.order_id)[-1:] == ["fulfilled"]

        await wait_until(fulfilled, what="the order processed")
        heard_before = len(status_listener.statuses(order.order_id))

        url = MqttUrl.parse(config.mqtt_url)
        async with MqttClient(url, client_id=f"{device_id}-dev", clean_start=True) as device:
            # Garbage, an unknown id, and the other device asking for this device's order.
            assert await device.publish_acked(status_query_topic(device_id), b"\xc1garbage") == 0
            unknown = StatusQuery(v=1, order_ids=("unknown-order-1",))
            assert await device.publish_acked(status_query_topic(device_id), encode(unknown)) == 0
            theirs = StatusQuery(v=1, order_ids=(order.order_id,))
            assert await device.publish_acked(status_query_topic(other_device), encode(theirs)) == 0
            # The real question comes last: once it is answered, the others were handled.
            query = StatusQuery(v=1, order_ids=(order.order_id, "unknown-order-2"))
            assert await device.publish_acked(status_query_topic(device_id), encode(query)) == 0

        async def answered() -> bool:
            return len(status_listener.statuses(order.order_id)) == heard_before + 1

        await wait_until(answered, what="the status again")
        await asyncio.sleep(0.3)
        assert status_listener.statuses(order.order_id) == ["confirmed", "fulfilled", "fulfilled"]
        topics = [t for t, s in status_listener.received if s.order_id == order.order_id]
        assert set(topics) == {f"v1/devices/{device_id}/status"}
        assert not [s for _t, s in status_listener.received if s.order_id.startswith("unknown")]
        assert worker.poll() is None, "the worker survived the bad query"
        lines = log.read_text()
        assert "status_query_bad_payload" in lines
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 20) == 0
    finally:
        stop_all([worker])


def why_unheard(
    worker: subprocess.Popen[bytes], log: Path, broker: MosquittoProcess, *codes: int
) -> str:
    """A failure message for queries the broker matched to no subscriber (PUBACK 16):
    the codes, the worker's log and what the broker logged about the worker's client id."""
    client_id = f"pipeline-{socket.gethostname()}-{worker.pid}"
    broker_lines = [
        line
        for line in broker.log_path.read_text(errors="replace").splitlines()
        if client_id in line
    ]
    worker_lines = log.read_text(errors="replace").splitlines()[-20:]
    return "\n".join([
        f"PUBACK reason codes: {dict(Counter(codes))}; worker alive: {worker.poll() is None}",
        f"broker log on {client_id}:", *broker_lines, "worker log (tail):", *worker_lines,
    ])  # fmt: skip


def answered_by(log: Path) -> int:
    """Status queries the worker writing ``log`` answered."""
    return log.read_text(errors="replace").count('"status_query_answered"')


@pytest.mark.usefixtures("catalog")
async def test_a_status_query_flood_stalls_no_other_devices_statuses(  # noqa: PLR0917 - fixtures
    aredis: aioredis.Redis,
    config: PipelineConfig,
    mosquitto: MosquittoProcess,
    status_listener: StatusListener,
    device_id: str,
    tmp_path: Path,
) -> None:
    """One device floods status queries (600 of 100 ids, 20 of them known): Mosquitto hands
    the worker more than its Receive Maximum, past the client's parking limit. Another
    device's orders still get their statuses about as fast as before the flood, every query
    is answered, and the same worker process carries on (no restart). The per-device query
    budget is lifted so that the flood reaches the client (test_device_budgets sheds it)."""
    flooder, other = f"{device_id}-flood", f"{device_id}-other"
    status_listener.subscribe(flooder)
    status_listener.subscribe(other)
    log = tmp_path / "worker.log"
    unlimited = env_for(config, log_level="info", status_query_device_per_min=1_000_000)
    worker = spawn(["worker"], unlimited, log)
    try:
        # Subscribed before any order or query: the flood must reach this test's worker.
        await wait_until(lambda: "worker_started" in log.read_text(), what="the worker started")
        known = [make_order(flooder, seq) for seq in range(20)]
        for order in known:
            await produce(aredis, order, config.shards)

        async def known_done() -> bool:
            return all("fulfilled" in status_listener.statuses(o.order_id) for o in known)

        def fulfilled_heard(order_id: str) -> int:
            return status_listener.statuses(order_id).count("fulfilled")

        await wait_until(known_done, what="the flooder's orders processed")

        async def status_latency(seq: int) -> float:
            order = make_order(other, seq)
            started = asyncio.get_running_loop().time()
            await produce(aredis, order, config.shards)
            await wait_until(lambda: "fulfilled" in status_listener.statuses(order.order_id),
                             what=f"the other device's order {seq} processed")  # fmt: skip
            return asyncio.get_running_loop().time() - started

        before = sorted([await status_latency(seq) for seq in range(5)])[2]
        padding = [f"unknown-{index:056d}" for index in range(80)]
        query = encode(StatusQuery(v=1, order_ids=(*[o.order_id for o in known], *padding)))
        url = MqttUrl.parse(config.mqtt_url)
        async with MqttClient(url, client_id=f"{device_id}-dev", clean_start=True) as device:
            # One query answered first: the worker's subscription works on the broker now,
            # so a failure of the flood below is the flood's (and not a lost subscription's).
            probe = await device.publish_acked(status_query_topic(flooder), query)
            assert probe == 0, why_unheard(worker, log, mosquitto, probe)
            await wait_until(lambda: fulfilled_heard(known[0].order_id) == 2,
                             what="the probe query answered")  # fmt: skip
            # ... by this test's worker. Another one on the session's Redis and broker (a
            # supervisor's worker orphaned by an earlier test's SIGKILL once was) shares
            # the subscription and takes queries that this worker then never answers.
            await wait_until(lambda: answered_by(log) == 1, what="the probe answered here",
                             explain=lambda: why_unheard(worker, log, mosquitto))  # fmt: skip
            asked = [device.publish_acked(status_query_topic(flooder), query) for _ in range(600)]
            during = sorted([await status_latency(seq) for seq in range(5, 10)])[2]
            codes = await asyncio.gather(*asked)
            assert codes == [0] * 600, why_unheard(worker, log, mosquitto, *codes)

        async def all_answered() -> bool:
            return fulfilled_heard(known[0].order_id) == 602

        await wait_until(all_answered, timeout_s=60, what="every query answered",
                         explain=lambda: f"{answered_by(log)} answered by this worker")  # fmt: skip
        after = sorted([await status_latency(seq) for seq in range(10, 15)])[2]
        assert during <= 10 * before, (before, during)
        assert after <= 10 * before, (before, after)
        assert "held back" in log.read_text()  # the fault: the parking passed its limit
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 20) == 0
    finally:
        stop_all([worker])
