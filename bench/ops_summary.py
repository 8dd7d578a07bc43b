"""Cost of the ops page's summary (GET /v1/ops/summary) by fleet size.

Seeds N devices' health keys (as the health consumer writes them) and 16 shard
streams into a private Redis, then times a full summary (shards, fleet scan,
DLQ sizes, bridges) 20 times per size. Run: `.venv/bin/python -m bench.ops_summary`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from pipeline.ops import (
    HEALTH_DEVICES_KEY,
    HEALTH_OLDEST_KEY,
    FleetView,
    health_device_key,
    summary,
)
from servicekit.clock import now_ms
from testrig.servers import RedisProcess

SIZES = (100, 1000, 10_000)
RUNS = 20


async def seed(client: aioredis.Redis, devices: int) -> None:
    """``devices`` online devices, one outbox order each."""
    now = now_ms()
    async with client.pipeline(transaction=False) as pipe:
        for i in range(devices):
            device = f"dev-{i:06d}"
            pipe.zadd(HEALTH_DEVICES_KEY, {device: now - i})
            pipe.zadd(HEALTH_OLDEST_KEY, {device: i})
            pipe.hset(health_device_key(device), mapping={"online": "1", "seen_at": now - i})
        await pipe.execute()


async def main() -> None:
    """Print the median and max summary time per fleet size."""
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp)) as server:
        client = aioredis.Redis.from_url(server.url)
        for shard in range(16):
            await client.xadd(f"orders:{{{shard}}}", {"payload": b"x" * 300})
        for devices in SIZES:
            await client.delete(HEALTH_DEVICES_KEY, HEALTH_OLDEST_KEY)
            await seed(client, devices)
            times = []
            for _ in range(RUNS):
                started = time.perf_counter()
                # A fresh view each time: the cost of a scan, not of the 5 s cache.
                await summary(client, shards=16, fleet=FleetView(), role="open")
                times.append(time.perf_counter() - started)
            print(
                f"{devices:>6} devices: summary median {statistics.median(times) * 1000:6.1f} ms, "
                f"max {max(times) * 1000:6.1f} ms"
            )
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
