"""The fleet-health view in Redis: real agents, a real worker process, real Mosquitto and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster

from edge_agent import AgentConfig, EdgeAgent
from pipeline.config import PipelineConfig
from pipeline.health import HealthConsumer, HealthMetrics
from pipeline.names import HEALTH_DEVICES_KEY, HEALTH_OLDEST_KEY, health_device_key
from pipeline.ops import FleetView, VersionCount, summary
from schemas import Health, encode
from schemas.names import health_topic
from servicekit.clock import now_ms
from servicekit.redis_clients import text
from servicekit.version import package_version
from testrig.servers import MosquittoProcess
from tests.helpers import wait_until

from ..bridge.conftest import redis_cluster  # noqa: F401  (a fixture)
from ..edge_agent.agent_process import AgentProcess
from ..fleet.mqtt_probe import Probe
from .processes import env_for, spawn, stop_all

BODY = {"currency": "EUR", "items": [{"sku": "COLA-33", "qty": 1, "unit_price": 150}], "total": 150}
NOW_MS = now_ms()  # real time: the worker refuses a report far from its clock


def report(**figures: Any) -> bytes:
    """An encoded online report with ``figures``."""
    return encode(Health(v=1, online=True, at=NOW_MS - 5, **figures))


@pytest.fixture
async def worker(
    config: PipelineConfig, tmp_path: Path, mosquitto: MosquittoProcess, aredis: aioredis.Redis
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``order-pipeline worker`` (it hosts the health consumer), subscribed, until the test ends."""
    process = spawn(["worker"], env_for(config, log_level="info"), tmp_path / "worker.log")
    try:
        with Probe(mosquitto.port) as probe:

            async def subscribed() -> bool:  # a message that lands proves the subscription
                assert process.poll() is None
                assert probe.publish(health_topic("probe-0"), report()) in (0, 16)  # 16: no one yet
                await asyncio.sleep(0.1)
                return await aredis.exists(health_device_key("probe-0")) == 1

            await wait_until(subscribed, what="the worker's health subscription")
        await aredis.delete(health_device_key("probe-0"), HEALTH_DEVICES_KEY, HEALTH_OLDEST_KEY)
        yield process
    finally:
        stop_all([process])


async def device_hash(aredis: aioredis.Redis, device_id: str) -> dict[str, str]:
    raw = await aredis.hgetall(health_device_key(device_id))
    return {text(k): text(v) for k, v in raw.items()}


async def wait_hash(
    aredis: aioredis.Redis, device_id: str, predicate: Callable[[dict[str, str]], bool]
) -> dict[str, str]:
    """The device's health hash once ``predicate`` holds for it."""
    found: dict[str, str] = {}

    async def holds() -> bool:
        found.clear()
        found.update(await device_hash(aredis, device_id))
        return bool(found) and predicate(found)

    await wait_until(holds, what=f"health of {device_id}")
    return found


async def test_an_agents_health_reaches_redis_and_its_clean_stop_marks_it_offline(
    worker: subprocess.Popen[bytes], aredis: aioredis.Redis, config: PipelineConfig,
    tmp_path: Path, device_id: str,
) -> None:  # fmt: skip
    """A real agent with 3 unreceipted orders (no bridge): the hash, zsets and TTL say so."""
    agent_config = AgentConfig(
        device_id=device_id, mqtt_url=config.mqtt_url, db=str(tmp_path / "o.db"),
        http_enabled=False, health_interval_s=0.5,
    )  # fmt: skip
    async with EdgeAgent(agent_config) as agent:
        for _ in range(3):
            await agent.submit(BODY)
        seen = await wait_hash(
            aredis, device_id, lambda h: h.get("outbox_depth") == "3" and int(h["at"]) > 0
        )
        assert seen["online"] == "1"
        assert int(seen["outbox_bytes"]) == agent.outbox.store.pending_bytes
        assert seen["held"] == "0"
        assert seen["agent_version"] == agent.reporter.version
        assert int(seen["oldest_unreceipted_age_ms"]) >= 0
        assert "last_broker_error" not in seen
        assert abs(int(seen["seen_at"]) - int(seen["at"])) < 5000
        oldest = await aredis.zscore(HEALTH_OLDEST_KEY, device_id)
        assert oldest is not None
        last_seen = await aredis.zscore(HEALTH_DEVICES_KEY, device_id)
        assert last_seen is not None
        assert abs(last_seen - int(seen["seen_at"])) < 5000
        ttl_ms = await aredis.pttl(health_device_key(device_id))
        assert 0 < ttl_ms <= config.health_ttl_s * 1000
    gone = await wait_hash(aredis, device_id, lambda h: h["online"] == "0")
    assert gone["outbox_depth"] == "3"  # the goodbye carries the figures
    assert worker.poll() is None


async def test_the_ops_summary_counts_a_mixed_fleet_by_agent_version(  # noqa: PLR0917 - fixtures
    worker: subprocess.Popen[bytes], aredis: aioredis.Redis, mosquitto: MosquittoProcess,
    config: PipelineConfig, tmp_path: Path, device_id: str,
) -> None:  # fmt: skip
    """A real agent reports this release; two fakes report 0.1.0; one speaks the format from
    before ``agent_version`` (no such key) and is still accepted, counted as not reported."""
    agent_config = AgentConfig(
        device_id=device_id, mqtt_url=config.mqtt_url, db=str(tmp_path / "o.db"),
        http_enabled=False, health_interval_s=3600,
    )  # fmt: skip
    old_format = msgspec.msgpack.encode({"v": 1, "online": True, "at": NOW_MS, "outbox_depth": 4})
    async with EdgeAgent(agent_config) as agent:
        seen = await wait_hash(aredis, device_id, lambda h: h["online"] == "1")
        assert seen["agent_version"] == agent.reporter.version == package_version()
        with Probe(mosquitto.port) as fakes:
            for old in ("old-1", "old-2"):
                assert fakes.publish(health_topic(old), report(agent_version="0.1.0")) == 0
            assert fakes.publish(health_topic("older-1"), old_format) == 0
            for old in ("old-1", "old-2"):
                await wait_hash(aredis, old, lambda h: h.get("agent_version") == "0.1.0")
            older = await wait_hash(aredis, "older-1", lambda h: h.get("outbox_depth") == "4")
        assert "agent_version" not in older
        fleet = (await summary(aredis, shards=1, fleet=FleetView(), role="open")).fleet
    assert fleet.versions == [
        VersionCount(version="0.1.0", devices=2, online=2),
        VersionCount(version=None, devices=1, online=1),
        VersionCount(version=package_version(), devices=1, online=1),
    ]
    assert worker.poll() is None


async def test_a_sigkilled_agent_is_marked_offline_by_its_will(
    worker: subprocess.Popen[bytes], aredis: aioredis.Redis, mosquitto: MosquittoProcess,
    tmp_path: Path, device_id: str,
) -> None:  # fmt: skip
    """SIGKILL (proven): the Will sets online=0 and at; the last figures stay."""
    agent = AgentProcess(
        tmp_path, device_id=device_id, mqtt_url=mosquitto.url, db=tmp_path / "o.db",
        health_interval_s=3600,
    )  # fmt: skip
    agent.start()
    try:
        online = await wait_hash(aredis, device_id, lambda h: h["online"] == "1")
        agent.sigkill()
        offline = await wait_hash(aredis, device_id, lambda h: h["online"] == "0")
    finally:
        agent.stop()
    assert int(offline["seen_at"]) > int(online["seen_at"])
    assert int(offline["at"]) <= int(online["at"])  # the Will's time is the connect time
    assert offline["agent_version"] == online["agent_version"]
    assert offline["outbox_depth"] == "0"
    assert await aredis.zscore(HEALTH_OLDEST_KEY, device_id) == 0


async def test_bad_health_messages_are_counted_and_the_worker_goes_on(
    worker: subprocess.Popen[bytes], aredis: aioredis.Redis, mosquitto: MosquittoProcess,
    device_id: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Garbage, wrong types, a bad topic: logged with the reason; the next good one lands."""
    with Probe(mosquitto.port) as device:
        for payload in (b"\xc1garbage", encode(Health(v=1, online=True, at=1))[:-1],
                        b"\x81\xa1v\xa3one"):  # fmt: skip
            assert device.publish(health_topic(device_id), payload) == 0
        assert device.publish(health_topic(device_id), report(outbox_depth=7)) == 0
        await wait_hash(aredis, device_id, lambda h: h.get("outbox_depth") == "7")
    assert worker.poll() is None
    log = (tmp_path / "worker.log").read_text()
    assert log.count("health_bad_payload") == 3, log[-2000:]


@pytest.fixture
async def consumer(aredis: aioredis.Redis) -> HealthConsumer:
    """An in-process consumer on the flushed Redis, its own metrics, a settable clock."""
    clock = [NOW_MS]
    made = HealthConsumer(
        aredis, HealthMetrics(CollectorRegistry()), ttl_s=3600, clock=lambda: clock[0]
    )
    made.clock_ms = clock  # type: ignore[attr-defined]
    return made


async def test_reports_replace_figures_and_a_will_keeps_them(
    consumer: HealthConsumer, aredis: aioredis.Redis
) -> None:
    """A report deletes the figures it leaves out; a Will changes only online, at, seen_at."""
    topic = health_topic("kiosk-1")
    await consumer.write([(topic, report(outbox_depth=2, last_broker_error="lost"))])
    await consumer.write([(topic, report(outbox_depth=0, oldest_unreceipted_age_ms=9))])
    after = await device_hash(aredis, "kiosk-1")
    assert after == {"online": "1", "at": str(NOW_MS - 5), "seen_at": str(NOW_MS),
                     "outbox_depth": "0", "oldest_unreceipted_age_ms": "9"}  # fmt: skip
    assert await aredis.zscore(HEALTH_OLDEST_KEY, "kiosk-1") == 9
    consumer.clock_ms[0] += 1000  # type: ignore[attr-defined]
    await consumer.write([(topic, encode(Health(v=1, online=False, at=NOW_MS - 100)))])
    will = await device_hash(aredis, "kiosk-1")
    assert will == {**after, "online": "0", "at": str(NOW_MS - 100), "seen_at": str(NOW_MS + 1000)}
    assert await aredis.zscore(HEALTH_OLDEST_KEY, "kiosk-1") == 0
    assert await aredis.zscore(HEALTH_DEVICES_KEY, "kiosk-1") == NOW_MS + 1000
    kinds = consumer._metrics.messages
    assert [kinds.labels(k)._value.get() for k in ("report", "will", "offline")] == [2, 1, 0]


async def test_bad_messages_are_counted_by_reason_and_skipped(
    consumer: HealthConsumer, aredis: aioredis.Redis
) -> None:
    """A bad message in a batch is counted by reason; the good ones in it are written."""
    written = await consumer.write([
        ("v1/devices/a:b/health", report()),
        (health_topic("kiosk-2"), b"\x93\x01\x02"),
        (health_topic("kiosk-2"), encode(Health(v=1, online=True, at=1)).replace(b"\xc3", b"\x01")),
        (health_topic("kiosk-3"), report(held=1)),
    ])  # fmt: skip
    assert written == 1
    invalid = consumer._metrics.invalid
    assert invalid.labels("bad_topic")._value.get() == 1
    [family] = list(invalid.collect())
    total = sum(s.value for s in family.samples if s.name.endswith("_total"))
    assert total == 3
    assert await aredis.exists(health_device_key("kiosk-2")) == 0
    assert (await device_hash(aredis, "kiosk-3"))["held"] == "1"


async def test_sweep_drops_devices_silent_past_the_ttl_and_counts_states(
    consumer: HealthConsumer, aredis: aioredis.Redis
) -> None:
    """Devices last seen before now − TTL leave both zsets; the gauge counts the rest."""
    await consumer.write([(health_topic("old-1"), report()), (health_topic("old-2"), report())])
    consumer.clock_ms[0] += 3000 * 1000  # type: ignore[attr-defined]
    await consumer.write([
        (health_topic("up-1"), report(oldest_unreceipted_age_ms=50)),
        (health_topic("down-1"), encode(Health(v=1, online=False, at=1))),
    ])  # fmt: skip
    consumer.clock_ms[0] += 1000 * 1000  # type: ignore[attr-defined]  # old-*: 4000 s > 3600 s
    assert await consumer.sweep() == (2, 1, 1)
    assert await aredis.zrange(HEALTH_DEVICES_KEY, 0, -1) == [b"down-1", b"up-1"]
    assert await aredis.zrange(HEALTH_OLDEST_KEY, 0, -1) == [b"down-1", b"up-1"]
    gauge = consumer._metrics.devices
    assert gauge.labels("online")._value.get() == 1
    assert gauge.labels("offline")._value.get() == 1


@pytest.fixture
async def cluster_client(redis_cluster: list[int]) -> AsyncIterator[RedisCluster]:  # noqa: F811
    """A cluster client on the bridge tests' real 3-master cluster."""
    client = RedisCluster(host="127.0.0.1", port=redis_cluster[0])
    yield client
    with contextlib.suppress(redis.RedisError):
        await client.aclose()


async def test_the_view_works_on_a_redis_cluster(cluster_client: RedisCluster) -> None:
    """One key per command: writes and the sweep run on a real Redis Cluster."""
    clock = [NOW_MS]
    consumer = HealthConsumer(
        cluster_client,
        HealthMetrics(CollectorRegistry()), ttl_s=10, clock=lambda: clock[0],
    )  # fmt: skip
    devices = [f"kiosk-{i}" for i in range(20)]
    await consumer.write([(health_topic(d), report(outbox_depth=i)) for i, d in enumerate(devices)])
    assert await cluster_client.zcard(HEALTH_DEVICES_KEY) == 20
    assert await cluster_client.hget(health_device_key("kiosk-7"), "outbox_depth") == b"7"
    assert await consumer.sweep() == (0, 20, 0)
    clock[0] += 11_000
    assert await consumer.sweep() == (20, 0, 0)
    assert await cluster_client.zcard(HEALTH_OLDEST_KEY) == 0
