"""`order-pipeline migrate`: data written in the layout before Redis Cluster support moves over."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from pipeline.migrate import MIGRATED_STOCK_KEY, migrate
from pipeline.names import LEGACY_STOCK_KEY, order_key
from pipeline.records import load_order
from pipeline.stock import stock_levels

from .api_client import api_client
from .conftest import TEST_SHARDS


async def write_old_order(client: Any, device_id: str, order_id: str, status: str) -> None:
    """An order as the previous release stored it: record, history list, reservation hash."""
    key = f"order:{device_id}:{order_id}"
    items = json.dumps([{"sku": "COLA-33", "qty": 2, "unit_price": 150}])
    await client.hset(key, mapping={
        "order_id": order_id, "device_id": device_id, "seq": 3, "received_at": 5,
        "total": 300, "currency": "EUR", "items": items, "stream": "orders:{1}",
        "entry_id": "1-1", "created": 6, "status": status, "reason": "", "updated_at": 7,
        "done:validate": 7, "done:reserve": 7,
    })  # fmt: skip
    for step, st in (("", "received"), ("validate", "validated"), ("reserve", status)):
        line = json.dumps({"status": st, "step": step, "reason": "", "at": 7})
        await client.rpush(f"{key}:history", line)
    await client.hset(f"{key}:reservation", mapping={"_state": "held", "s:COLA-33": 2})
    await client.zadd(f"device:{device_id}:orders", {f"{3:020d}:{order_id}": 0})
    await client.sadd(f"order-id:{order_id}:devices", device_id)


async def test_migrate_moves_stock_and_records_once(aredis: Any, device_id: str) -> None:
    """Old stock lands spread over the shards, old records become tagged records the API
    reads (history, reservation, indexes), the old keys go, and a second run moves nothing."""
    await aredis.hset(LEGACY_STOCK_KEY, mapping={"COLA-33": 1001, "WATER-50": 7})
    await write_old_order(aredis, device_id, "order-old-0001", "reserved")
    await aredis.pexpire(f"order:{device_id}:order-old-0001", 60_000)
    first = await migrate(aredis, TEST_SHARDS)
    assert (first.skus, first.orders) == (2, 1)
    assert await stock_levels(aredis, TEST_SHARDS, ["COLA-33", "WATER-50"]) == {
        "COLA-33": 1001, "WATER-50": 7,
    }  # fmt: skip
    assert await aredis.exists(LEGACY_STOCK_KEY) == 0
    assert await aredis.exists(MIGRATED_STOCK_KEY) == 1
    record = await load_order(aredis, device_id, "order-old-0001", shards=TEST_SHARDS)
    assert record is not None
    assert record["status"] == "reserved"
    assert [h["status"] for h in record["history"]] == ["received", "validated", "reserved"]
    assert record["items"] == [{"sku": "COLA-33", "qty": 2, "unit_price": 150}]
    assert record["steps_done"] == ["reserve", "validate"]
    new_key = order_key(device_id, "order-old-0001", TEST_SHARDS)
    assert await aredis.hmget(new_key, ["res", "res:COLA-33"]) == [b"held", b"2"]
    assert 0 < await aredis.pttl(new_key) <= 60_000
    assert await aredis.exists(f"order:{device_id}:order-old-0001") == 0
    async with api_client(aredis, TEST_SHARDS) as http:
        page = await (await http.get(f"/v1/devices/{device_id}/orders")).json()
        assert [item["order_id"] for item in page["items"]] == ["order-old-0001"]
        found = await http.get("/v1/orders/order-old-0001")
        assert found.status == 200
    again = await migrate(aredis, TEST_SHARDS)
    assert (again.skus, again.orders) == (0, 0)
    assert (await stock_levels(aredis, TEST_SHARDS, ["COLA-33"]))["COLA-33"] == 1001


def test_cli_migrate_runs_and_refuses_a_cluster(redis_url: str) -> None:
    """`order-pipeline migrate` exits 0 on a single Redis (nothing to move) and 2 with
    --redis-cluster (the old layout never ran on one)."""
    base = [sys.executable, "-m", "pipeline.cli", "migrate", "--redis-url", redis_url]
    done = subprocess.run(base, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert b'"msg": "migrated"' in done.stderr
    refused = subprocess.run([*base, "--redis-cluster"], capture_output=True,
                             timeout=30, check=False)  # fmt: skip
    assert refused.returncode == 2
    assert b"single Redis of the old layout" in refused.stderr
