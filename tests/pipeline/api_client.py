"""Test helper: the orders API on a real local port, over a real Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipeline.api import create_app


@contextlib.asynccontextmanager
async def api_client(
    client: aioredis.Redis, shards: int
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """Serve the orders API and yield an HTTP client for it."""
    server = TestServer(create_app(client, shards=shards))
    async with TestClient(server) as http:
        yield http
