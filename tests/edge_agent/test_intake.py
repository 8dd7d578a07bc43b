"""HTTP intake: 202 after commit, idempotency, problem bodies, paging, health, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from edge_agent import AgentConfig, EdgeAgent
from tests.helpers import raw_http

from .conftest import order_body


@pytest.fixture
async def agent(make_config: Callable[..., AgentConfig]) -> AsyncIterator[EdgeAgent]:
    """An agent with HTTP intake on a free port (no bridge: orders stay queued)."""
    async with EdgeAgent(make_config(max_rows=5)) as running:
        yield running


@pytest.fixture
async def http(agent: EdgeAgent) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session pointed at the agent."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{agent.http_port}") as session:
        yield session


async def test_post_is_202_and_idempotent(http: aiohttp.ClientSession, agent: EdgeAgent) -> None:
    """POST answers 202 with the id; the same order_id again gives the same answer and one order."""
    async with http.post("/v1/orders", json=order_body("order-http1")) as resp:
        assert resp.status == 202
        first = await resp.json()
    async with http.post("/v1/orders", json=order_body("order-http1", qty=9)) as resp:
        assert resp.status == 202
        assert await resp.json() == first == {"order_id": "order-http1", "status": "queued"}
    rows, _ = await agent.list_orders()
    assert [r.order_id for r in rows] == ["order-http1"]


async def test_generated_order_id(http: aiohttp.ClientSession) -> None:
    """Without an order_id the agent generates one and GET finds it."""
    async with http.post("/v1/orders", json=order_body()) as resp:
        assert resp.status == 202
        order_id = (await resp.json())["order_id"]
    async with http.get(f"/v1/orders/{order_id}") as resp:
        assert resp.status == 200
        record = await resp.json()
    assert record["state"] in ("queued", "sent")
    # The v1 answer's keys: the send counter is `attempts` here, `regions` only in geo mode.
    assert set(record) == {
        "order_id", "seq", "state", "status", "reason", "attempts",
        "created_ms", "updated_ms", "settled_ms",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "reason", "field"),
    [
        (b"{not json", 400, "malformed", "$"),
        (b"[1, 2]", 400, "malformed", "$"),
        (b'{"currency": "eur", "items": [{"sku": "a", "qty": 1, "unit_price": 1}], "total": 1}',
         422, "invalid_schema", "$.currency"),
        (b'{"currency": "EUR", "items": [{"sku": "a", "qty": 1, "unit_price": 1}], "total": 5}',
         422, "total_mismatch", "$.total"),
        (b'{"currency": "EUR", "items": [], "total": 0}', 422, "invalid_schema", "$.items"),
        (b'{"device_id": "x", "currency": "EUR", "items": [{"sku": "a", "qty": 1, '
         b'"unit_price": 1}], "total": 1}', 422, "invalid_schema", "$.device_id"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_problem_naming_the_field(
    http: aiohttp.ClientSession, body: bytes, status: int, reason: str, field: str
) -> None:
    """Bad input gets 400/422 with an RFC 9457 problem body naming reason and field."""
    async with http.post(
        "/v1/orders", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == status
        assert resp.content_type == "application/problem+json"
        problem = await resp.json()
    assert problem["status"] == status
    assert problem["reason"] == reason
    assert problem["field"] == field
    assert problem["type"].endswith(reason)
    assert problem["title"]
    assert problem["detail"]


async def test_too_large_is_refused_at_intake(http: aiohttp.ClientSession) -> None:
    """An order that would encode past 16 KiB is refused with 422 too_large, never queued."""
    body = order_body("order-huge")
    body["attrs"] = {"note": "x" * 17_000}
    async with http.post("/v1/orders", json=body) as resp:
        assert resp.status == 422
        assert (await resp.json())["reason"] == "too_large"
    async with http.get("/v1/orders/order-huge") as resp:
        assert resp.status == 404


async def test_full_outbox_is_507(http: aiohttp.ClientSession, agent: EdgeAgent) -> None:
    """At the cap POST answers 507 and the stored orders stay as they were."""
    for i in range(5):
        async with http.post("/v1/orders", json=order_body(f"order-full{i}")) as resp:
            assert resp.status == 202
    before, _ = await agent.list_orders(limit=10)
    async with http.post("/v1/orders", json=order_body("order-full9")) as resp:
        assert resp.status == 507
        assert (await resp.json())["reason"] == "outbox_full"
    after, _ = await agent.list_orders(limit=10)
    assert [(r.order_id, r.seq) for r in after] == [(r.order_id, r.seq) for r in before]


async def test_list_is_newest_first_with_cursor(http: aiohttp.ClientSession) -> None:
    """GET /v1/orders pages newest first and next_cursor walks to the end."""
    ids = [f"order-page{i}" for i in range(5)]
    for order_id in ids:
        async with http.post("/v1/orders", json=order_body(order_id)) as resp:
            assert resp.status == 202
    seen: list[str] = []
    cursor = ""
    for _ in range(5):
        async with http.get("/v1/orders", params={"limit": "2", "cursor": cursor}) as resp:
            page = await resp.json()
        seen += [o["order_id"] for o in page["orders"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == ids[::-1]
    async with http.get("/v1/orders", params={"state": "accepted"}) as resp:
        assert (await resp.json())["orders"] == []
    async with http.get("/v1/orders", params={"limit": "0"}) as resp:
        assert resp.status == 400


async def test_health_and_metrics(http: aiohttp.ClientSession) -> None:
    """/healthz reports depth and age; /metrics counts submits in this agent's registry."""
    async with http.post("/v1/orders", json=order_body("order-metric")) as resp:
        assert resp.status == 202
    async with http.get("/healthz") as resp:
        assert resp.status == 200
        health = await resp.json()
    assert health["outbox_depth"] == 1
    assert health["oldest_unreceipted_age_s"] is not None
    assert health["storage_error"] is None
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert "edge_orders_submitted_total 1.0" in text
    assert "edge_outbox_pending_orders 1.0" in text


async def _problem(resp: aiohttp.ClientResponse, status: int, reason: str) -> dict[str, Any]:
    assert resp.status == status
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json()
    assert body["status"] == status
    assert body["code"] == reason
    if "-" not in reason:  # agent reason codes are repeated as `reason`; HTTP-level ones aren't
        assert body["reason"] == reason
    assert body["type"] == f"urn:iot-orders:problem:{reason}"
    return body


async def test_only_json_is_accepted(http: aiohttp.ClientSession, agent: EdgeAgent) -> None:
    """A cross-origin text/plain or form post (all a web page can send) is 415, nothing stored."""
    body = json.dumps(order_body("order-csrf1"))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        async with http.post(
            "/v1/orders",
            data=body,
            headers={"Content-Type": content_type, "Origin": "https://evil.example"},
        ) as resp:
            await _problem(resp, 415, "unsupported_media_type")
            assert "Access-Control-Allow-Origin" not in resp.headers
    async with http.post(
        "/v1/orders", data=body, headers={"Content-Type": "application/json; charset=utf-8"}
    ) as resp:
        assert resp.status == 202
    rows, _ = await agent.list_orders()
    assert [r.order_id for r in rows] == ["order-csrf1"]


async def test_host_must_be_loopback_or_configured(
    make_config: Callable[..., AgentConfig],
) -> None:
    """DNS rebinding (Host: evil name) gets 421; loopback names and a configured name work."""
    async with EdgeAgent(make_config(http_allowed_hosts="kiosk-7.local")) as agent:
        port = agent.http_port
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                         "localhost.", "kiosk-7.local.evil", "localhost:99999x"):  # fmt: skip
                async with session.post(
                    "/v1/orders", json=order_body("order-rebind1"), headers={"Host": host}
                ) as resp:
                    await _problem(resp, 421, "misdirected_request")
            for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                         "KIOSK-7.local", f"kiosk-7.local:{port}"):  # fmt: skip
                async with session.get("/healthz", headers={"Host": host}) as resp:
                    assert resp.status == 200, host
        assert await agent.get("order-rebind1") is None


async def test_optional_local_token(make_config: Callable[..., AgentConfig]) -> None:
    """With http_token set, /v1 needs the bearer token (else a 401 problem); /healthz stays open."""
    token = "local-token-" + "x" * 20
    async with (
        EdgeAgent(make_config(http_token=token)) as agent,
        aiohttp.ClientSession(f"http://127.0.0.1:{agent.http_port}") as session,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            async with session.post(
                "/v1/orders", json=order_body("order-tok1"), headers=headers
            ) as resp:
                await _problem(resp, 401, "unauthorized")
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {token}"}
        async with session.post("/v1/orders", json=order_body("order-tok1"), headers=auth) as resp:
            assert resp.status == 202
        async with session.get("/v1/orders/order-tok1", headers=auth) as resp:
            assert resp.status == 200
        async with session.get("/healthz") as resp:
            assert resp.status == 200
        # `edge-agent submit` sends the token it is given (exit 3 refused without it).
        base = [sys.executable, "-m", "edge_agent.cli", "submit", "--http-port",
                str(agent.http_port), json.dumps(order_body("order-tok2"))]  # fmt: skip
        for extra, code in (([], 3), (["--token", token], 0)):
            proc = await asyncio.create_subprocess_exec(
                *base, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            await proc.communicate()
            assert proc.returncode == code
        assert await agent.get("order-tok2") is not None


async def test_every_error_is_a_problem_405_and_413_included(http: aiohttp.ClientSession) -> None:
    """405 (with Allow), 413 and 404 for an unknown path are problem+json, not text/plain."""
    async with http.delete("/v1/orders") as resp:
        body = await _problem(resp, 405, "method-not-allowed")
        assert "POST" in resp.headers["Allow"]
        assert body["detail"]
    async with http.post(
        "/v1/orders", data=b"{" + b" " * 70_000 + b"}", headers={"Content-Type": "application/json"}
    ) as resp:
        await _problem(resp, 413, "payload-too-large")
    async with http.get("/v2/nothing") as resp:
        await _problem(resp, 404, "not-found")


@pytest.mark.parametrize(
    ("body", "status", "reason", "field"),
    [
        (b"[" * 32_000 + b"]" * 32_000, 400, "malformed", "$"),  # under the 64 KiB body cap
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, "malformed", "$"),
        (b'{"currency": "EUR", "items": [{"sku": "a", "qty": 1, '
         b'"unit_price": 18446744073709551616}], "total": 18446744073709551616}',
         422, "invalid_schema", None),
        (b'{"currency": "EUR", "items": [{"sku": "a", "qty": 4, '
         b'"unit_price": 4611686018427387904}], "total": 18446744073709551616}',
         422, "invalid_schema", None),
        (b'{"order_id": "order-nl-0001\\n", "currency": "EUR", "items": [{"sku": "a", "qty": 1,'
         b' "unit_price": 1}], "total": 1}', 422, "invalid_schema", "$.order_id"),
        (b'{"currency": "EUR\\n", "items": [{"sku": "a", "qty": 1, "unit_price": 1}], "total": 1}',
         422, "invalid_schema", "$.currency"),
        (b'{"currency": "EUR", "items": [{"sku": "a\\u0000b", "qty": 1, "unit_price": 1}], '
         b'"total": 1}',
         422, "invalid_schema", "$.items[0].sku"),
    ],
)  # fmt: skip
async def test_hostile_bodies_are_4xx_never_500(
    http: aiohttp.ClientSession, body: bytes, status: int, reason: str, field: str | None
) -> None:
    """32k-deep JSON, integers past 2^64-1 and control characters get a 4xx problem, not a 500."""
    async with http.post(
        "/v1/orders", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        problem = await _problem(resp, status, reason)
    if field is not None:
        assert problem["field"] == field


@pytest.mark.parametrize(
    "query",
    [
        {"cursor": str(2**63)},
        {"cursor": str(2**64)},
        {"cursor": "9" * 5000},
        {"cursor": "-1"},
        {"cursor": "\u0661"},  # an Arabic-Indic digit: int() takes it, we don't
        {"limit": "1_0"},
        {"limit": " 5"},
        {"state": "queued\n"},
    ],
)
async def test_hostile_list_queries_are_400(
    http: aiohttp.ClientSession, query: dict[str, str]
) -> None:
    """A list cursor at or past 2^63, odd digits or a control character in state: 400, not 500."""
    async with http.get("/v1/orders", params=query) as resp:
        await _problem(resp, 400, "invalid_query")


async def test_get_with_a_bad_order_id_is_400(http: aiohttp.ClientSession) -> None:
    """An order id with a newline is refused by the contract's rule, not looked up."""
    async with http.get("/v1/orders/order-00000001%0A") as resp:
        await _problem(resp, 400, "invalid_query")


def _sample(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


async def test_metrics_show_the_oldest_unreceipted_age(http: aiohttp.ClientSession) -> None:
    """edge_outbox_oldest_pending_age_seconds is 0 with an empty outbox, then the age of the
    oldest queued order (no bridge here, so it never gets a receipt)."""
    name = "edge_outbox_oldest_pending_age_seconds"
    async with http.get("/metrics") as resp:
        assert _sample(await resp.text(), name) == 0
    async with http.post("/v1/orders", json=order_body("order-age")) as resp:
        assert resp.status == 202
    await asyncio.sleep(0.3)
    async with http.get("/metrics") as resp:
        age = _sample(await resp.text(), name)
    assert 0.3 <= age < 60


async def test_unparsable_requests_are_problems_that_echo_and_log_no_token(
    make_config: Callable[..., AgentConfig], caplog: pytest.LogCaptureFixture
) -> None:
    """A header over aiohttp's 8190-byte limit carrying the intake's token, and a header
    line without a colon, each get a 400 problem (aiohttp's own text/plain 400 quoted the
    header and logged it at error level); the token is in no body and no log line."""
    token = "local-token-" + "s" * 24
    requests = [
        b"POST /v1/orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token.encode() + b"x" * 9000 + b"\r\n\r\n",
        b"GET /v1/orders HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization Bearer "
        + token.encode() + b"\r\n\r\n",
    ]  # fmt: skip
    async with EdgeAgent(make_config(http_token=token)) as agent:
        port = agent.http_port
        assert port is not None
        with capture_logs() as events, caplog.at_level(logging.DEBUG):
            answers = [await asyncio.to_thread(raw_http, port, request) for request in requests]
    for status, content_type, body in answers:
        assert (status, content_type.split(";")[0]) == (400, "application/problem+json")
        assert (body["code"], body["status"]) == ("bad-request", 400)
        assert token not in json.dumps(body)
    assert token not in caplog.text
    assert token not in repr(events)
    assert [e["event"] for e in events].count("http_bad_request") == 2
