"""What one Redis round trip costs the client in CPU, per way of making it (issue 25).

Not a test. One process on uvloop, one private Redis: ``--calls`` of each
form (a PING, a direct XREADGROUP, a pipeline of one XREADGROUP, a pipeline of
an XACK and an XREADGROUP, a direct EVALSHA), CPU µs per call of this process
(``time.process_time``). At one order per batch a worker's cost per order is
about its round trips times this, plus the event loop and MQTT work.

    .venv/bin/python bench/redis_call_cost.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

import servicekit.redis_clients  # noqa: F401 (installs the services' send, as they run it)
from testrig.servers import RedisProcess


async def measure(url: str, calls: int) -> list[tuple[str, float]]:
    """CPU µs per call of each form."""
    client = aioredis.Redis.from_url(url)
    await client.xgroup_create("s", "g", id="0", mkstream=True)
    sha = await client.script_load("return 1")

    async def ping() -> None:
        await client.ping()

    async def direct() -> None:
        await client.xreadgroup("g", "c", {"s": ">"}, count=10)

    async def pipe_one() -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.xreadgroup("g", "c", {"s": ">"}, count=10)
            await pipe.execute()

    async def pipe_two() -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.xack("s", "g", "0-1")
            pipe.xreadgroup("g", "c", {"s": ">"}, count=10)
            await pipe.execute()

    async def evalsha() -> None:
        await client.evalsha(sha, 0)

    forms: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("PING", ping),
        ("XREADGROUP", direct),
        ("pipeline: XREADGROUP", pipe_one),
        ("pipeline: XACK + XREADGROUP", pipe_two),
        ("EVALSHA", evalsha),
    ]
    out = []
    for name, form in forms:
        for _ in range(200):
            await form()
        started = time.process_time()
        for _ in range(calls):
            await form()
        out.append((name, (time.process_time() - started) / calls * 1e6))
    await client.aclose()
    return out


def main() -> None:
    """Parse flags, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, RedisProcess(Path(tmp) / "redis") as server:
        rows = uvloop.run(measure(server.url, args.calls))
    for name, us in rows:
        print(f"{name:30} {us:6.0f} µs CPU per call")


if __name__ == "__main__":
    main()
