"""Backward compatibility, both pairs: an agent without attempts against region-aware bridges,
and a region-aware agent against a single-region bridge."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fleet.geo.stack import GeoStack, start_service
from fleet.verify import OrderRef
from schemas.names import stream_key
from testrig.servers import MosquittoProcess
from testrig.services import ServiceProcess, console_script, http_ok
from tests.helpers import wait_until

from .conftest import SHARDS, entries, geo_agent, outbox


async def test_agent_without_attempts_against_region_aware_bridges(
    rig: GeoStack, tmp_path: Path, device_id: str
) -> None:
    """Today's agent (no regions) is served by whichever region it talks to, once per order."""
    for region in rig.regions:
        db = tmp_path / f"{region.name}.db"
        refs = await _plain_orders(region.name, region.mqtt_url, db, f"{device_id}-{region.name}")
        assert all(row.attempts == () for row in outbox(db).values())
        others = {r.name: 0 for r in rig.regions if r is not region}
        assert all(entries(rig, ref) == {region.name: 1, **others} for ref in refs)


async def _plain_orders(name: str, mqtt_url: str, db: Path, device_id: str) -> list[OrderRef]:
    """Three orders from an agent without regions, receipted."""
    async with geo_agent([(name, mqtt_url)], db, device_id=device_id, region=()) as agent:
        assert agent.region is None, "the agent is in geo mode"
        refs = [agent.ref(await agent.submit()) for _ in range(3)]
        await wait_until(lambda: all(r in agent.tracker.receipted for r in refs), what="receipts")
    return refs


@pytest.fixture
def plain_bridge(
    mosquitto: MosquittoProcess, redis_url: str, tmp_path: Path
) -> Iterator[ServiceProcess]:
    """A single-region order-bridge (no region flags) on the session's broker and Redis."""
    run = uuid.uuid4().hex[:8]
    bridge = ServiceProcess(
        "bridge", tmp_path / "plain-bridge",
        [console_script("order-bridge"), "--mqtt-url", mosquitto.url, "--redis-url", redis_url,
         "--shards", str(SHARDS), "--client-id", f"plain-{run}", "--share-group", f"plain-{run}",
         "--no-redis-require-durable"],
    )  # fmt: skip
    bridge.start_timeout_s = 60.0
    start_service(bridge)  # on a new port if a free one was taken meanwhile
    with bridge:
        deadline = time.monotonic() + 30
        while not http_ok(f"{bridge.url}/readyz"):  # subscribed: no order dropped with 0x10
            assert time.monotonic() < deadline, "plain bridge not ready"
            time.sleep(0.05)
        yield bridge


async def test_region_aware_agent_against_a_single_region_bridge(
    plain_bridge: ServiceProcess,
    mosquitto: MosquittoProcess,
    redis_url: str,
    tmp_path: Path,
    device_id: str,
) -> None:
    """A geo agent's orders (attempts = [solo]) are accepted by a bridge that knows no regions."""
    regions = [("solo", mosquitto.url), ("elsewhere", "mqtt://127.0.0.1:9")]
    async with geo_agent(regions, tmp_path / "o.db", device_id=device_id) as agent:
        order_ids = [await agent.submit() for _ in range(3)]
        await wait_until(lambda: all(agent.settled(o) for o in order_ids), what="receipts")
        assert agent.region == "solo"
        results = [agent.results(o) for o in order_ids]
    # A resend after a slow receipt may add a `duplicate`; the first answer is `accepted`.
    assert all(r[0] == "accepted" and set(r) <= {"accepted", "duplicate"} for r in results)
    assert {row.attempts for row in outbox(tmp_path / "o.db").values()} == {("solo",)}
    with redis.Redis.from_url(redis_url) as client:
        found = [
            fields[b"order_id"].decode()
            for shard in range(SHARDS)
            for _id, fields in client.xrange(stream_key(shard))
            if fields[b"device_id"].decode() == device_id
        ]
    assert sorted(found) == sorted(order_ids)
