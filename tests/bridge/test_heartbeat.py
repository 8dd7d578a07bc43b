"""The bridge replica's heartbeat (ops:bridge:{client_id}, ops:bridges) in a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bridge.heartbeat import FORGET_AFTER_MS, RedisHeartbeat, run_heartbeat, ttl_for
from schemas.names import BRIDGES_KEY, bridge_key
from servicekit.clock import now_ms
from servicekit.version import package_version
from testrig.servers import free_port
from tests.helpers import wait_until_blocking

from .conftest import BridgeProcess


def report() -> dict[str, str | int]:
    """A fixed report, as Bridge.heartbeat_report gives one."""
    return {"ready": 1, "redis_durable": 0, "in_flight": 3, "failing": ""}


async def test_beats_write_the_hash_with_a_ttl_and_the_zset(redis_url: str) -> None:
    """Each beat: the hash (with TTL 30 s) and the zset score; day-old replicas are forgotten."""
    client = aioredis.Redis.from_url(redis_url)
    await client.zadd(BRIDGES_KEY, {"long-gone": now_ms() - FORGET_AFTER_MS - 1000})
    closing = asyncio.Event()
    async with RedisHeartbeat(redis_url) as store:
        # The flag too, as the bridge does: Python 3.11 can lose the cancel (run_heartbeat's
        # docstring), and the test then hung until pytest-timeout in a loaded make test run.
        task = asyncio.create_task(run_heartbeat(store, "b-1", report, 0.05, closing.is_set))
        try:
            for _ in range(200):
                if await client.zscore(BRIDGES_KEY, "b-1"):
                    break
                await asyncio.sleep(0.02)
            first = await client.hgetall(bridge_key("b-1"))
            await asyncio.sleep(0.2)
        finally:
            closing.set()
            # A beat is the hash, then the zset (separate commands): the flag lets the one in
            # progress finish before the last is read. Read mid-beat, the zset lagged the
            # hash by one beat in a loaded run; the cancel is the fallback.
            await asyncio.wait({task}, timeout=10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    second = await client.hgetall(bridge_key("b-1"))
    assert first[b"ready"] == b"1"
    assert first[b"redis_durable"] == b"0"
    assert first[b"in_flight"] == b"3"
    assert first[b"interval_ms"] == b"50"
    assert first[b"version"] == package_version().encode()
    assert int(second[b"at"]) > int(first[b"at"])  # it keeps beating
    assert 0 < await client.ttl(bridge_key("b-1")) <= 30
    assert await client.zscore(BRIDGES_KEY, "b-1") == int(second[b"at"])
    assert await client.zscore(BRIDGES_KEY, "long-gone") is None
    await client.aclose()


def test_ttl_outlasts_six_beats() -> None:
    """30 s, or six intervals when beats are slower."""
    assert ttl_for(5) == 30
    assert ttl_for(10) == 60


async def test_a_failed_beat_is_logged_once_and_the_loop_goes_on() -> None:
    """Redis unreachable (a closed port): no exception, one warning, still beating after."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisHeartbeat(url, timeout_s=0.5) as store:
        with pytest.raises(RedisConnectionError):
            await store.beat("b-x", report(), 30)  # the fault is real
        with capture_logs() as logs:
            task = asyncio.create_task(run_heartbeat(store, "b-x", report, 0.01))
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    failures = [e for e in logs if e["event"] == "heartbeat_failed"]
    assert len(failures) == 1


async def test_recovers_after_failures() -> None:
    """A store that fails twice then works: one warning, then heartbeat_restored."""
    calls: list[dict[str, Any]] = []
    four = asyncio.Event()

    class Flaky:
        async def beat(self, client_id: str, fields: dict[str, str | int], ttl_s: int) -> None:
            calls.append(fields)
            if len(calls) >= 4:
                four.set()
            if len(calls) <= 2:
                raise RedisConnectionError("down")

    with capture_logs() as logs:
        task = asyncio.create_task(run_heartbeat(Flaky(), "b-y", report, 0.01))
        await asyncio.wait_for(four.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    events = [e["event"] for e in logs]
    assert events.count("heartbeat_failed") == 1
    assert events.count("heartbeat_restored") == 1


def test_a_real_bridge_beats_and_reports_redis_not_durable(
    bridge_factory: Callable[..., BridgeProcess], mqtt_url: str, redis_url: str
) -> None:
    """order-bridge writes its heartbeat: ready, and not durable (the test Redis has no AOF)."""
    bridge = bridge_factory(mqtt_url, redis_url, "--heartbeat-interval-s", "0.2")
    bridge.start()
    client = redis.Redis.from_url(redis_url)
    key = bridge_key(bridge.client_id)
    wait_until_blocking(lambda: client.hget(key, "ready") == b"1", 10, "a ready heartbeat")
    beat: Any = client.hgetall(key)
    assert beat[b"redis_durable"] == b"0"
    assert beat[b"interval_ms"] == b"200"
    assert client.zscore(BRIDGES_KEY, bridge.client_id) is not None
    bridge.kill()
    at = int(client.hget(key, "at") or 0)
    wait_until_blocking(lambda: now_ms() - at > 1000, 5, "a second to pass")
    assert int(client.hget(key, "at") or 0) == at  # a dead replica beats no more
    client.close()
