"""The orders API over real Redis: records, paging under inserts, DLQ, problems, health, metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from pipeline._lua import Scripts
from pipeline.api import openapi_document
from pipeline.dlq import DeadLetter, dead_letter, encode_cursor
from pipeline.names import PIPELINE_DLQ_STREAM
from pipeline.records import StreamEntry, commit, load
from schemas import Order, encode
from schemas.names import shard_of, stream_key
from servicekit.redis_clients import text
from testrig.servers import free_port
from tests.helpers import make_order

from .api_client import api_client
from .conftest import BACKENDS, TEST_SHARDS


async def admit_orders(client: aioredis.Redis, orders: list[Order]) -> None:
    """Record orders as a worker does when it first sees them (record + device index)."""
    batch = [
        (StreamEntry(stream_key(shard_of(o.device_id, TEST_SHARDS)), f"1-{o.seq}",
                     {"received_at": b"1", "payload": encode(o)}), o)
        for o in orders
    ]  # fmt: skip
    scripts = Scripts()
    await commit(
        client, scripts, await load(client, scripts, batch, shards=TEST_SHARDS), shards=TEST_SHARDS
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_paging_while_orders_arrive_returns_each_once(
    aredis: aioredis.Redis, device_id: str
) -> None:
    """Pages of 7 while new orders land between requests: every order exactly once, none missed."""
    first = [make_order(device_id, seq) for seq in range(30)]
    later = [make_order(device_id, seq) for seq in range(30, 60)]
    await admit_orders(aredis, first)
    seen: list[str] = []
    async with api_client(aredis, TEST_SHARDS) as http:
        cursor = ""
        for page_no in range(40):
            if page_no < len(later) // 5:
                # Five new orders arrive before each of the first pages.
                await admit_orders(aredis, later[page_no * 5 : page_no * 5 + 5])
            params = {"limit": "7", **({"cursor": cursor} if cursor else {})}
            response = await http.get(f"/v1/devices/{device_id}/orders", params=params)
            assert response.status == 200
            body = await response.json()
            seen += [item["order_id"] for item in body["items"]]
            cursor = body["next_cursor"]
            if not body["has_more"] and page_no >= len(later) // 5:
                break
        # Coming back later with the last cursor yields nothing new, and nothing twice.
        tail = await (await http.get(f"/v1/devices/{device_id}/orders",
                                     params={"cursor": cursor})).json()  # fmt: skip
        assert tail["items"] == []
        assert tail["next_cursor"] == cursor
    assert len(seen) == len(set(seen))
    assert seen == [o.order_id for o in first + later]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_order_record_and_problems(aredis: aioredis.Redis, device_id: str) -> None:
    """A known order has its record and history; bad input and unknown ids get problem+json."""
    order = make_order(device_id, 4, [("COLA-33", 2, 150)])
    await admit_orders(aredis, [order])
    async with api_client(aredis, TEST_SHARDS) as http:
        body = await (await http.get(f"/v1/orders/{order.order_id}")).json()
        assert body["device_id"] == device_id
        assert body["status"] == "received"
        assert body["items"] == [{"sku": "COLA-33", "qty": 2, "unit_price": 150}]
        assert [h["status"] for h in body["history"]] == ["received"]
        for path, status, code in [
            ("/v1/orders/UNKNOWN-ORDER-1", 404, "order-not-found"),
            ("/v1/orders/bad!", 400, "invalid-parameter"),
            (f"/v1/devices/{device_id}/orders?limit=0", 400, "invalid-parameter"),
            (f"/v1/devices/{device_id}/orders?cursor=***", 400, "invalid-cursor"),
            ("/v1/dlq?cursor=bm90LWFuLWlk", 400, "invalid-cursor"),
            ("/v1/nothing-here", 404, "not-found"),
        ]:
            response = await http.get(path)
            assert response.status == status, path
            assert response.content_type == "application/problem+json"
            problem = json.loads(await response.text())
            assert problem["type"] == f"urn:iot-orders:problem:{code}"
            assert problem["status"] == status
        missing = await http.post("/v1/dlq/1-1/replay")
        assert missing.status == 404
        assert (await missing.json())["code"] == "dlq-entry-not-found"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_an_order_id_on_two_devices_is_ambiguous_without_the_device(
    aredis: aioredis.Redis, device_id: str
) -> None:
    """One order_id on two devices: /v1/orders/{id} is a 409 naming both; the device path works."""
    other = f"{device_id}-b"
    orders = [make_order(dev, 0, order_id="order-00000001") for dev in (device_id, other)]
    await admit_orders(aredis, orders[:1])
    async with api_client(aredis, TEST_SHARDS) as http:
        single = await http.get("/v1/orders/order-00000001")
        assert single.status == 200
        assert (await single.json())["device_id"] == device_id
        await admit_orders(aredis, orders[1:])
        ambiguous = await http.get("/v1/orders/order-00000001")
        assert ambiguous.status == 409
        assert ambiguous.content_type == "application/problem+json"
        problem = json.loads(await ambiguous.text())
        assert problem["code"] == "ambiguous-order-id"
        assert problem["device_ids"] == sorted([device_id, other])
        for dev in (device_id, other):
            body = await (await http.get(f"/v1/devices/{dev}/orders/order-00000001")).json()
            assert (body["device_id"], body["order_id"]) == (dev, "order-00000001")
        for path, status, code in [
            (f"/v1/devices/{device_id}/orders/order-00000002", 404, "order-not-found"),
            (f"/v1/devices/{device_id}/orders/bad!", 400, "invalid-parameter"),
            ("/v1/devices/bad!/orders/order-00000001", 400, "invalid-parameter"),
        ]:
            response = await http.get(path)
            assert response.status == status, path
            assert (await response.json(content_type=None))["code"] == code


async def test_dlq_pages_and_bridge_entries_are_not_replayable(aredis: aioredis.Redis) -> None:
    """Paging walks each queue's entries once; an intake entry is refused replay (422)."""
    letters = [
        DeadLetter(StreamEntry("orders:{0}", f"5-{i}", {"device_id": b"d1", "order_id": b"o",
                                                        "payload": b"\x01"}), "max_deliveries", "x")
        for i in range(5)
    ]  # fmt: skip
    await aredis.xgroup_create("orders:{0}", "pipeline", id="0", mkstream=True)
    await dead_letter(aredis, Scripts(), letters)
    bridge_fields: dict[FieldT, EncodableT] = {
        "reason": "malformed", "topic": "t", "payload": b"\x00", "received_at": 1
    }  # fmt: skip
    # Ids are per stream; this one is not also a pipeline:dlq id, which replay would look up first.
    bridge_id = text(await aredis.xadd("orders:dlq", bridge_fields, id="1-1"))
    async with api_client(aredis, TEST_SHARDS) as http:
        ids: list[str] = []
        cursor = None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            body = await (await http.get("/v1/dlq", params=params)).json()
            ids += [item["id"] for item in body["items"]]
            cursor = body["next_cursor"]
            if not body["has_more"]:
                break
        assert len(ids) == len(set(ids)) == 5
        intake = await (await http.get("/v1/dlq", params={"queue": "intake"})).json()
        assert [item["id"] for item in intake["items"]] == [bridge_id]
        assert intake["items"][0]["replayable"] is False
        bad_queue = await http.get("/v1/dlq", params={"queue": "other"})
        assert bad_queue.status == 400
        refused = await http.post(f"/v1/dlq/{bridge_id}/replay")
        assert refused.status == 422
        assert (await refused.json())["code"] == "not-replayable"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_replay_and_resolve_empty_the_pipeline_dlq(aredis: aioredis.Redis) -> None:
    """Replay moves the entry back to its stream (once) and out of pipeline:dlq; so does resolve."""
    letters = [
        DeadLetter(StreamEntry("orders:{0}", f"5-{i}", {"device_id": b"d1", "order_id": b"o%d" % i,
                                                        "payload": b"\x01"}), "max_deliveries", "x")
        for i in range(2)
    ]  # fmt: skip
    await aredis.xgroup_create("orders:{0}", "pipeline", id="0", mkstream=True)
    await dead_letter(aredis, Scripts(), letters)
    rows: Any = await aredis.xrange(PIPELINE_DLQ_STREAM)
    (first, _), (second, _) = rows
    first, second = first.decode(), second.decode()
    async with api_client(aredis, TEST_SHARDS) as http:
        replayed = await http.post(f"/v1/dlq/{first}/replay")
        assert replayed.status == 202
        replayed_as = (await replayed.json())["replayed_as"]
        again = await http.post(f"/v1/dlq/{first}/replay")
        assert again.status == 409
        assert (await again.json())["replayed_as"] == replayed_as
        resolved = await http.post(f"/v1/dlq/{second}/resolve")
        assert resolved.status == 200
        missing = await http.post(f"/v1/dlq/{second}/resolve")
        assert missing.status == 404
    assert await aredis.xlen(PIPELINE_DLQ_STREAM) == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_health_metrics_and_openapi(aredis: aioredis.Redis) -> None:
    """/healthz answers, /metrics carries the per-shard gauges, /openapi.json is the document."""
    await asyncio.gather(*(aredis.xgroup_create(stream_key(s), "pipeline", id="0", mkstream=True)
                           for s in range(TEST_SHARDS)))  # fmt: skip
    await aredis.xadd(stream_key(1), {"x": 1})
    async with api_client(aredis, TEST_SHARDS) as http:
        assert (await (await http.get("/healthz")).json()) == {"status": "ok"}
        text = await (await http.get("/metrics")).text()
        assert 'pipeline_lag{shard="1"} 1.0' in text
        assert 'pipeline_pending{shard="0"} 0.0' in text
        assert "pipeline_dlq_size 0.0" in text
        assert await (await http.get("/openapi.json")).json() == openapi_document()


async def test_hostile_ids_and_cursors_are_4xx_problems_never_500(aredis: aioredis.Redis) -> None:
    """The inputs that once got a 500: a DLQ cursor at the max id, ids ending in %0A, and more."""
    max_id = f"{2**64 - 1}-{2**64 - 1}"
    async with api_client(aredis, TEST_SHARDS) as http:
        at_max = await http.get("/v1/dlq", params={"cursor": encode_cursor(max_id)})
        assert at_max.status == 200
        assert await at_max.json() == {
            "items": [],
            "next_cursor": encode_cursor(max_id),
            "has_more": False,
        }
        for method, path, status in [
            ("POST", "/v1/dlq/1-1%0A/replay", 400),
            ("POST", "/v1/dlq/%D9%A1-%D9%A1/replay", 400),  # Arabic-Indic digits match \d
            ("POST", f"/v1/dlq/{2**64}-1/replay", 400),
            ("GET", "/v1/orders/order-00000001%0A", 400),
            ("GET", "/v1/orders/order-0000%000001", 400),
            ("GET", "/v1/devices/dev%0A/orders", 400),
            ("GET", "/v1/devices/dev/orders/order-00000001%0A", 400),
            ("GET", "/v1/dlq?limit=" + "1" * 5000, 400),
            ("GET", "/v1/dlq?cursor=" + encode_cursor("1-1\n"), 400),
            (
                "GET",
                "/v1/devices/dev/orders?cursor=" + encode_cursor("0" * 20 + ":order-001\n"),
                400,
            ),
            ("DELETE", "/v1/dlq", 405),
        ]:
            response = await http.request(method, path)
            assert response.status == status, path
            assert response.content_type == "application/problem+json", path
            body = await response.json()
            assert body["status"] == status
            assert body["type"] == f"urn:iot-orders:problem:{body['code']}"
        not_allowed = await http.delete("/v1/dlq")
        assert "GET" in not_allowed.headers["Allow"]


async def test_redis_down_is_503_not_500() -> None:
    """A Redis that does not answer makes a request 503 redis-unavailable, not a 500."""
    dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        async with api_client(dead, TEST_SHARDS) as http:
            for path in ("/v1/dlq", "/v1/orders/order-00000001", "/healthz"):
                response = await http.get(path)
                assert response.status == 503, path
                assert (await response.json())["code"] == "redis-unavailable"
    finally:
        await dead.aclose()
