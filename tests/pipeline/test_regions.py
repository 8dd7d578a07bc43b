"""Geo mode of the orders API: an order owned by region A, asked for at region B's real
``order-pipeline``, is proxied from A's API; nowhere is 404; an unreachable region is 503."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from pipeline.api import create_app
from pipeline.config import PipelineConfig
from pipeline.records import load_order
from pipeline.regions import (
    LOOKUP_HEADER,
    REGION_HEADER,
    REGION_LOOKUP,
    RegionLookup,
    parse_region_apis,
)
from pipeline.service import worker_env
from servicekit.config import ConfigError, add_config_arguments, load_config
from servicekit.problems import PROBLEM_CONTENT_TYPE
from testrig.servers import RedisProcess, free_port
from tests.helpers import make_order, wait_until

from .conftest import TEST_SHARDS, WorkerFactory
from .processes import env_for, spawn, stop_all
from .producer import produce


class ApiServer:
    """The orders API of one region, served in this event loop."""

    def __init__(self, app: web.Application) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner = web.AppRunner(app)

    async def start(self) -> None:
        """Listen."""
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening: the region's API is gone."""
        await self._runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def _get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any, Any]:
    async with http.get(url, headers=headers) as reply:
        return reply.status, await reply.json(content_type=None), reply.headers


@pytest.mark.usefixtures("catalog")
async def test_an_order_owned_elsewhere_is_proxied_from_its_region(
    aredis: aioredis.Redis,
    *,
    start_worker: WorkerFactory,
    redis_factory: Callable[..., RedisProcess],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    device_id: str,
) -> None:
    """Region A (shared Redis, a worker, its API) owns the order; B's real pipeline proxies it."""
    order = msgspec.structs.replace(make_order(device_id, 1), attempts=("a",))
    await start_worker()
    await produce(aredis, order, TEST_SHARDS)

    async def processed() -> bool:
        return await load_order(aredis, device_id, order.order_id, shards=TEST_SHARDS) is not None

    await wait_until(processed, what="region A processed the order")

    b_port = free_port()
    b_url = f"http://127.0.0.1:{b_port}"
    app_a = create_app(aredis, shards=TEST_SHARDS)
    lookup_a = RegionLookup("a", {"b": b_url}, timeout_s=2)
    app_a[REGION_LOOKUP] = await lookup_a.__aenter__()
    api_a = ApiServer(app_a)
    await api_a.start()

    redis_b = redis_factory()
    config_b = PipelineConfig(
        redis_url=redis_b.url, http_port=b_port, workers=0, shards=TEST_SHARDS
    )
    env = env_for(
        config_b, region="b", region_api=f"a={api_a.url},b={b_url}", region_api_allow_http=True
    )
    pipeline_b = spawn(["run"], env, tmp_path / "pipeline-b.log")
    try:

        async def b_up() -> bool:
            try:
                return (await _get(http, f"{b_url}/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_until(b_up, what="region B's pipeline API up")

        path = f"/v1/orders/{order.order_id}"
        status, body, headers = await _get(http, f"{b_url}{path}")
        assert status == 200, body
        assert (body["order_id"], body["device_id"]) == (order.order_id, device_id)
        assert headers[REGION_HEADER] == "a"
        assert "Content-Location" not in headers  # the peer's address stays private
        device_path = f"/v1/devices/{device_id}/orders/{order.order_id}"
        status, body, headers = await _get(http, f"{b_url}{device_path}")
        assert (status, body["order_id"], headers[REGION_HEADER]) == (200, order.order_id, "a")

        # Nowhere: A asks B, B (seeing the lookup header) answers from its own data: 404.
        missing = f"/v1/orders/{'x' * 12}"
        assert (await _get(http, f"{b_url}{missing}"))[0] == 404
        assert (await _get(http, f"{api_a.url}{missing}"))[0] == 404
        # A lookup is answered locally only: B has no such order itself.
        assert (await _get(http, f"{b_url}{path}", **{LOOKUP_HEADER: "a"}))[0] == 404

        await api_a.stop()
        status, body, _ = await _get(http, f"{b_url}{missing}")
        assert (status, body["code"], body["unreachable_regions"]) == (
            503,
            "region-unavailable",
            ["a"],
        )
        assert pipeline_b.poll() is None
    finally:
        stop_all([pipeline_b])
        await lookup_a.__aexit__(None, None, None)


def _parse(argv: list[str]) -> PipelineConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PipelineConfig)
    return load_config(PipelineConfig, parser.parse_args(argv), {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--region-api", "a=http://x"], "region_api needs region"),
        (["--region", "b", "--region-api", "a=ftp://x"], "is not NAME=http"),
        (["--region", "b", "--region-api", "a=https://x", "--region-api", "a=https://y"], "twice"),
        (["--region", "b", "--region-api", "a=http://x"], "a=http://… is plain HTTP"),
        (["--region", "B"], "is not 1-32 chars"),
    ],
)
def test_bad_region_api_settings_are_refused(argv: list[str], message: str) -> None:
    """Each mistake is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=message):
        _parse(argv)


def test_worker_processes_get_repeatable_settings_back_intact() -> None:
    """The supervisor hands region_api to its workers as a comma list they parse again."""
    config = _parse([
        "--region", "b", "--region-api", "a=https://x:1", "--region-api", "c=http://y",
        "--region-api-allow-http",
    ])  # fmt: skip
    env = worker_env(config, {}, "/tmp/m")
    again = load_config(PipelineConfig, None, env)
    assert again.region_api == ("a=https://x:1", "c=http://y")
    assert again.region_api_allow_http


class Peer:
    """Another region's API as a real HTTP server on loopback that answers what a test says,
    and records the headers of each lookup it gets."""

    def __init__(self, answers: dict[str, tuple[int, str, bytes]]) -> None:
        self.answers = answers
        self.seen: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_get("/v1/orders/{order_id}", self._answer)
        self.server = ApiServer(app)

    async def _answer(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        status, content_type, body = self.answers[request.match_info["order_id"]]
        return web.Response(
            status=status, body=body, headers={"Content-Type": content_type,
            "Content-Location": "http://peer.internal/secret-path"},
        )  # fmt: skip


async def test_the_proxy_relays_json_only_and_keeps_the_token_and_the_peer_private(
    aredis: aioredis.Redis, http: aiohttp.ClientSession
) -> None:
    """An http:// peer (allowed explicitly) never gets the caller's bearer token; its JSON
    answer is relayed without Content-Location; HTML, a JSON label on a non-JSON body, and a
    401 are never relayed (502 problem, 502 problem, 503 region-unavailable)."""
    record = msgspec.json.encode({"order_id": "relayed-1", "status": "fulfilled"})
    peer = Peer({
        "relayed-1": (200, "application/json", record),
        "htmlpage-1": (200, "text/html", b"<script>alert(document.cookie)</script>"),
        "notjson-1": (200, "application/json; charset=utf-8", b"<script>x</script>"),
        "wantstoken": (401, "application/problem+json", b'{"code":"unauthorized"}'),
    })  # fmt: skip
    await peer.server.start()
    apis = parse_region_apis("b", (f"a={peer.server.url}",), allow_http=True)
    app_b = create_app(aredis, shards=TEST_SHARDS)
    lookup = RegionLookup("b", apis, timeout_s=5)
    app_b[REGION_LOOKUP] = await lookup.__aenter__()
    api_b = ApiServer(app_b)
    await api_b.start()
    token = {"Authorization": "Bearer iotp_caller-secret-token"}
    try:
        status, body, headers = await _get(http, f"{api_b.url}/v1/orders/relayed-1", **token)
        assert (status, body, headers[REGION_HEADER]) == (200, msgspec.json.decode(record), "a")
        assert headers["Content-Type"].startswith("application/json")
        assert "Content-Location" not in headers
        for order_id in ("htmlpage-1", "notjson-1"):
            async with http.get(f"{api_b.url}/v1/orders/{order_id}", headers=token) as reply:
                text = await reply.text()
                assert (reply.status, reply.content_type) == (502, PROBLEM_CONTENT_TYPE)
            assert json.loads(text)["code"] == "region-bad-answer"
            assert "script" not in text
        status, body, _ = await _get(http, f"{api_b.url}/v1/orders/wantstoken", **token)
        assert (status, body["code"], body["unreachable_regions"]) == (
            503, "region-unavailable", ["a"],
        )  # fmt: skip
    finally:
        await api_b.stop()
        await lookup.__aexit__(None, None, None)
        await peer.server.stop()
    assert len(peer.seen) == 4
    assert [seen.get("Authorization") for seen in peer.seen] == [None] * 4
    assert {seen.get(LOOKUP_HEADER) for seen in peer.seen} == {"b"}
