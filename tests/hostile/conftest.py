"""The hostile-input suite: generated requests and payloads at every entry point.

``make test`` runs a short form (``CASES`` per target). ``HOSTILE_SLOW=1``
runs the full form: at least 10,000 generated cases per target, with the
memory check meaningful at that size.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from edge_agent import AgentConfig, EdgeAgent
from fleet.servers import RedisProcess, free_port
from pipeline.api import create_app
from pipeline.tokens import TokenStore, digest_line, new_token, parse_entries

from .live import ServedInThread

SLOW: Final = bool(os.environ.get("HOSTILE_SLOW"))
CASES: Final = 10_000 if SLOW else 150
# RSS may grow while caches and allocator arenas warm up; after the first tenth
# of the run it must stay within this much (a leak of 1 KB per case over
# 10,000 cases would cross it).
RSS_SLACK_BYTES: Final = 24 * 1024 * 1024
SHARDS: Final = 4
READ_TOKEN: Final = new_token()
OPERATE_TOKEN: Final = new_token()


@pytest.fixture(scope="module")
def agent_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An agent whose broker is unreachable (so only HTTP works), on a real port."""
    db = tmp_path_factory.mktemp("hostile-agent") / "outbox.db"
    config = AgentConfig(
        device_id="hostile-dev",
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",
        db=str(db),
        http_port=0,
        reconnect_min_s=1.0,
        reconnect_max_s=5.0,
        max_rows=10 * CASES + 100,
        max_bytes=1 << 30,
        http_allowed_hosts="kiosk.local",
    )

    @asynccontextmanager
    async def serve() -> AsyncIterator[int]:
        async with EdgeAgent(config) as agent:
            assert agent.http_port is not None
            yield agent.http_port

    server = ServedInThread(serve, "hostile-agent").start_serving()
    yield server.port
    server.stop()


@pytest.fixture(scope="module")
def api_port(redis_server: RedisProcess) -> Iterator[int]:
    """The orders API with a read and an operate token, over the shared Redis, on a real port."""
    tokens = TokenStore(
        parse_entries(
            digest_line(READ_TOKEN, "read") + "\n" + digest_line(OPERATE_TOKEN, "operate"),
            source="test",
        )
    )

    @asynccontextmanager
    async def serve() -> AsyncIterator[int]:
        client = aioredis.Redis.from_url(redis_server.url)
        runner = web.AppRunner(create_app(client, shards=SHARDS, tokens=tokens))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield runner.addresses[0][1]
        finally:
            await runner.cleanup()
            await client.aclose()

    server = ServedInThread(serve, "hostile-orders-api").start_serving()
    yield server.port
    server.stop()
