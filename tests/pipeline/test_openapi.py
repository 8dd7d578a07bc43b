"""The orders API against its published OpenAPI document, with schemathesis (few examples)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings

from pipeline.api import create_app, openapi_document
from pipeline.api_tokens import TokenStore, digest_line, new_token, parse_entries
from pipeline.openapi import DOCUMENT_PATH, render
from schemas.json_schema import JSON_DIR
from testrig.servers import RedisProcess, free_port

from .conftest import TEST_SHARDS

schema = schemathesis.openapi.from_dict(openapi_document())


class LiveApi(threading.Thread):
    """The API served from its own event loop in a thread, for synchronous HTTP clients."""

    def __init__(self, redis_url: str, tokens: TokenStore | None = None) -> None:
        super().__init__(name="live-api", daemon=True)
        self.redis_url = redis_url
        self.tokens = tokens
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
        runner = web.AppRunner(create_app(client, shards=TEST_SHARDS, tokens=self.tokens))
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


OPERATOR_TOKEN = new_token()


@pytest.fixture(scope="module")
def live_api(redis_server: RedisProcess) -> Iterator[str]:
    """Base URL of the API on a real port over the shared Redis, with one operate token."""
    tokens = TokenStore(parse_entries(digest_line(OPERATOR_TOKEN, "operate"), source="test"))
    api = LiveApi(redis_server.url, tokens)
    api.start()
    assert api.ready.wait(10)
    yield f"http://127.0.0.1:{api.port}"
    api.stop()


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case[Any], live_api: str) -> None:
    """Generated requests get no 5xx, only documented answers, and 401 without the token."""
    # Cursors are opaque: a well-formed string the API never issued is a documented 400,
    # which the positive-data check (any schema-valid request must succeed) cannot know.
    case.call_and_validate(
        base_url=live_api,
        headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        # Unknown query parameters are ignored by design (cache busters, tracing), which
        # schemathesis's negative-data check would count as "schema-violating data accepted".
        excluded_checks=[
            schemathesis.checks.positive_data_acceptance,
            schemathesis.checks.negative_data_rejection,
        ],
    )


def test_committed_document_matches_the_code() -> None:
    """Drift check: regenerate with `python -m pipeline.openapi` when this fails."""
    assert DOCUMENT_PATH.read_text() == render(), f"{DOCUMENT_PATH} is stale"


def test_document_is_openapi_3_1_with_the_bearer_scheme() -> None:
    """It says 3.1.0 and is 3.1 (no 3.0 `nullable`); reads need read, replay needs operate."""
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    assert '"nullable"' not in json.dumps(doc)
    assert doc["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`order-pipeline token new --role read|operate`",
    }
    paths = doc["paths"]
    assert paths["/v1/dlq/{entry_id}/replay"]["post"]["x-required-role"] == "operate"
    assert paths["/v1/dlq"]["get"]["x-required-role"] == "read"
    assert paths["/healthz"]["get"]["security"] == []
    # The path parameters are the wire contract's own rules.
    order_id = paths["/v1/orders/{order_id}"]["get"]["parameters"][0]["schema"]
    wire = json.loads((JSON_DIR / "order.v1.json").read_text())["$defs"]["Order"]["properties"]
    assert order_id["pattern"] == wire["order_id"]["pattern"]
    assert order_id["minLength"] == wire["order_id"]["minLength"] == 8
