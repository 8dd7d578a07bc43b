"""A configuration mistake never costs an accepted order (issue 21, GEO.md "Authority unknown
to R"): a real agent whose home region is ``ap`` talks to a real bridge that knows only ``eu``.
Its orders wait on the device as ``pending`` (nothing rejected, nothing dead-lettered, nothing
written); once the bridge is restarted with ``--region-redis ap=…`` every one lands in ap's
streams exactly once, with no hand on the device."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import redis

from edge_agent import AgentConfig, EdgeAgent
from schemas import Reason
from schemas.names import DLQ_STREAM
from testrig.servers import RedisProcess
from tests.edge_agent.conftest import order_body
from tests.helpers import wait_until

from .conftest import BridgeProcess, stream_entries

ORDERS = 40
LANDED_WITHIN_S = 60.0  # the bound, from the restarted bridge being ready


def _unknown_answers(bridge: BridgeProcess) -> float:
    """``bridge_region_unknown_total{region="ap"}`` on the bridge's /metrics (0 when absent)."""
    for line in bridge.metrics().splitlines():
        if line.startswith('bridge_region_unknown_total{region="ap"}'):
            return float(line.split()[-1])
    return 0.0


def _order_ids(client: redis.Redis) -> Counter[str]:
    return Counter(e[b"order_id"].decode() for e in stream_entries(client))


async def test_orders_of_a_home_region_the_bridge_does_not_know_wait_and_land_once_it_does(
    mqtt_url: str,
    redis_url: str,
    redis_factory: Callable[..., RedisProcess],
    bridge_factory: Callable[..., BridgeProcess],
    tmp_path: Path,
) -> None:
    ap_redis = redis_factory()
    eu = ("--region", "eu", "--region-redis", f"eu={redis_url}")
    eu_only = bridge_factory(mqtt_url, redis_url, *eu)
    await asyncio.to_thread(eu_only.start)
    config = AgentConfig(
        device_id=f"dev-{uuid.uuid4().hex[:12]}",
        region=(f"ap={mqtt_url}",),
        db=str(tmp_path / "outbox.db"),
        http_port=0,
        receipt_timeout_s=2.0,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        poll_interval_s=0.2,
        drain_rate_per_min=600_000.0,
        # Small caps, so the orders land soon after the fix (GEO.md: per-order backoff).
        pending_retry_min_s=0.2,
        pending_retry_max_s=1.0,
        puback_retry_min_s=0.1,
        puback_retry_max_s=1.0,
    )
    with redis.Redis.from_url(redis_url) as eu_db, redis.Redis.from_url(ap_redis.url) as ap_db:
        async with EdgeAgent(config) as agent, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{agent.http_port}"
            order_ids: list[str] = []
            for n in range(ORDERS):
                async with http.post(
                    f"{base}/v1/orders", json=order_body(f"home-ap-{n:03d}")
                ) as resp:
                    assert resp.status == 202
                    order_ids.append((await resp.json())["order_id"])

            def receipts(result: str) -> float:
                labels = {"result": result}
                return agent.metrics.registry.get_sample_value("edge_receipts_total", labels) or 0

            def answered() -> bool:
                return sum(receipts(r) for r in ("pending", "rejected", "accepted")) >= ORDERS

            await wait_until(answered, 30, "an answer per order")
            assert receipts("rejected") == 0
            # The fault happened and held: every order was answered `pending` at least
            # twice (its resends too), by a bridge that knows no `ap`.
            await wait_until(lambda: receipts("pending") >= 2 * ORDERS, 30, "resends pending")
            assert await asyncio.to_thread(_unknown_answers, eu_only) >= 2 * ORDERS
            records = [await agent.get(order_id) for order_id in order_ids]
            assert all(r is not None and r.state == "sent" for r in records), records
            assert {r.reason for r in records if r is not None} == {Reason.UNKNOWN_REGION}
            health = await agent.health()
            assert (health.outbox_depth, health.held) == (ORDERS, 0)
            assert health.awaiting_unknown_region == ORDERS
            assert health.awaiting_authority == ORDERS
            async with http.get(f"{base}/metrics") as resp:
                page = await resp.text()
            assert f"edge_orders_awaiting_unknown_region {ORDERS}.0" in page
            assert eu_db.xlen(DLQ_STREAM) == 0
            assert stream_entries(eu_db) == []
            assert stream_entries(ap_db) == []

            # The operator's fix, on the bridge only.
            assert await asyncio.to_thread(eu_only.terminate) == 0
            fixed = bridge_factory(mqtt_url, redis_url, *eu, "--region-redis", f"ap={ap_redis.url}")
            await asyncio.to_thread(fixed.start)
            learned = time.monotonic()

            async def all_accepted() -> bool:
                records = [await agent.get(order_id) for order_id in order_ids]
                return all(r is not None and r.state == "accepted" for r in records)

            await wait_until(all_accepted, LANDED_WITHIN_S, f"{ORDERS} orders accepted")
            took_s = time.monotonic() - learned
            assert took_s < LANDED_WITHIN_S
            assert _order_ids(ap_db) == Counter(dict.fromkeys(order_ids, 1))
            assert stream_entries(eu_db) == []
            assert eu_db.xlen(DLQ_STREAM) == 0
            health = await agent.health()
            assert (health.outbox_depth, health.awaiting_unknown_region) == (0, 0)
            assert _unknown_answers(fixed) == 0
