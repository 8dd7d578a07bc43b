"""Backward compatibility: a region-aware agent against the real single-region ``order-bridge``.

The bridge runs without any region flag, as every deployment before geo mode.
A one-region agent sends ``attempts=[home]`` with identical bytes on every
resend, so even a bridge whose dedup digest covers the whole payload answers
a resend ``duplicate``, never ``conflict``, and appends each order once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable

import msgspec
import redis

from edge_agent import AgentConfig, EdgeAgent
from tests.bridge.conftest import (
    BridgeProcess,
    bridge_factory,  # noqa: F401  (fixture)
    stream_entries,
)
from tests.helpers import wait_until

from .conftest import order_body


async def _all_accepted(agent: EdgeAgent, order_ids: list[str]) -> None:
    async def accepted() -> bool:
        for order_id in order_ids:
            record = await agent.get(order_id)
            if record is None or record.state != "accepted":
                return False
        return True

    await wait_until(accepted, 30, "orders accepted by the real bridge")


async def test_one_region_agent_against_a_single_region_bridge(
    make_config: Callable[..., AgentConfig],
    mqtt_url: str,
    redis_url: str,
    bridge_factory: Callable[..., BridgeProcess],  # noqa: F811
) -> None:
    bridge_factory(mqtt_url, redis_url).start()
    config = make_config(http_enabled=False, region=(f"home={mqtt_url}",))
    ids = [f"geo-compat-{i:03d}" for i in range(3)]
    async with EdgeAgent(config) as agent:
        for order_id in ids:
            await agent.submit(order_body(order_id))
        await _all_accepted(agent, ids)
        assert b'edge_receipts_total{result="accepted"} 3.0' in agent.metrics.render()

    # The receipts "got lost": the orders are unsettled again, as if they never came.
    with contextlib.closing(sqlite3.connect(config.db)) as conn, conn:
        changed = conn.execute(
            "UPDATE orders SET state = 'sent', settled_ms = NULL, status_query_ms = NULL"
        ).rowcount
    assert changed == len(ids)

    async with EdgeAgent(config) as agent:
        await _all_accepted(agent, ids)
        metrics = agent.metrics.render()
        assert b'edge_receipts_total{result="duplicate"} 3.0' in metrics  # not conflict
        assert b'result="rejected"' not in metrics

    with redis.Redis.from_url(redis_url) as client:
        entries = [
            e for e in stream_entries(client) if e[b"device_id"] == config.device_id.encode()
        ]
    assert sorted(e[b"order_id"].decode() for e in entries) == ids  # each appended once
    for entry in entries:
        assert msgspec.msgpack.decode(entry[b"payload"])["attempts"] == ["home"]
