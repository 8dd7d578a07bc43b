"""The TCP proxy's geo modes against a real Redis: blackhole (silence, no reset) and delay."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from servicekit.redis_clients import client_options
from testrig.proxy import TcpProxy
from testrig.servers import RedisProcess


async def test_blackhole_keeps_the_connection_silent_then_passes_again(
    redis_server: RedisProcess,
) -> None:
    """While blackholing, a PING times out (no reset, no error reply); afterwards it works."""
    async with TcpProxy("127.0.0.1", redis_server.port) as proxy:
        # As the bridge builds its clients: no redis-py retries, so one timeout is one PING.
        client = aioredis.Redis(port=proxy.port, **client_options(0.3))
        try:
            assert await client.ping()
            async with proxy.blackholing():
                started = time.monotonic()
                try:
                    await client.ping()
                except RedisTimeoutError:
                    pass
                else:
                    raise AssertionError("a PING got through the blackhole")
                waited = time.monotonic() - started
                assert waited >= 0.25  # silence until the timeout, no reset
                assert proxy.stats.blackholed_bytes > 0
            assert await client.ping()  # redis-py reconnects; new connections pass again
        finally:
            await client.aclose()


async def test_delay_adds_the_round_trip_without_serialising_requests(
    redis_server: RedisProcess,
) -> None:
    """delay_s=0.05 each way: one PING takes ≥ 0.1 s; 20 concurrent PINGs take far less than 20×."""
    async with TcpProxy("127.0.0.1", redis_server.port, delay_s=0.05) as proxy:
        client = aioredis.Redis(port=proxy.port, **client_options(5))
        try:
            await client.ping()  # connect first
            started = time.monotonic()
            await client.ping()
            one = time.monotonic() - started
            assert one >= 0.1
            pipe = client.pipeline(transaction=False)
            for _ in range(20):
                pipe.ping()
            started = time.monotonic()
            assert all(await pipe.execute())
            assert time.monotonic() - started < 20 * 0.1 / 2
            await asyncio.sleep(0)
        finally:
            await client.aclose()
