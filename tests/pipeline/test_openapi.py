"""The orders API against its published OpenAPI document, with schemathesis (few examples)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings

from fleet.servers import RedisProcess, free_port
from pipeline.api import create_app, openapi_document

from .conftest import TEST_SHARDS

schema = schemathesis.openapi.from_dict(openapi_document())


class LiveApi(threading.Thread):
    """The API served from its own event loop in a thread, for synchronous HTTP clients."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(name="live-api", daemon=True)
        self.redis_url = redis_url
        self.port = free_port()
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        client = aioredis.Redis.from_url(self.redis_url)
        runner = web.AppRunner(create_app(client, shards=TEST_SHARDS))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await runner.cleanup()
            await client.aclose()

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(10)


@pytest.fixture(scope="module")
def live_api(redis_server: RedisProcess) -> Iterator[str]:
    """Base URL of the API on a real port over the shared Redis."""
    api = LiveApi(redis_server.url)
    api.start()
    assert api.ready.wait(10)
    yield f"http://127.0.0.1:{api.port}"
    api.stop()


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any], live_api: str) -> None:
    """Generated requests get no 5xx, and only documented statuses, content types and bodies."""
    # Cursors are opaque: a well-formed string the API never issued is a documented 400,
    # which the positive-data check (any schema-valid request must succeed) cannot know.
    case.call_and_validate(
        base_url=live_api, excluded_checks=[schemathesis.checks.positive_data_acceptance]
    )
