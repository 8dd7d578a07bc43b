"""The agent end to end over a real broker, with the bridge double answering receipts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_agent import AgentConfig, EdgeAgent, InvalidOrder
from tests.helpers import wait_until

from .bridge_double import BridgeDouble
from .conftest import order_body


async def test_submitted_order_is_settled_by_receipt(
    make_config: Callable[..., AgentConfig], bridge: BridgeDouble
) -> None:
    """An order submitted through the API reaches the bridge and is settled by its receipt."""
    async with EdgeAgent(make_config(http_enabled=False)) as agent:
        result = await agent.submit(order_body("order-0001"))
        assert result.state == "queued"

        async def settled() -> bool:
            rec = await agent.get("order-0001")
            return rec is not None and rec.state == "accepted"

        await wait_until(settled, what="receipt")
        assert bridge.seen["order-0001"] >= 1
        health = await agent.health()
        assert health.outbox_depth == 0
        assert health.broker_connected


async def test_seq_increases_in_submit_order(
    make_config: Callable[..., AgentConfig], bridge: BridgeDouble
) -> None:
    """Each order gets the next per-device seq, also across a restart."""
    config = make_config(http_enabled=False)
    async with EdgeAgent(config) as agent:
        first = [await agent.submit(order_body(f"order-a{i:04d}")) for i in range(3)]
    async with EdgeAgent(config) as agent:
        second = [await agent.submit(order_body(f"order-b{i:04d}")) for i in range(3)]
    seqs = [r.seq for r in first + second]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 6


async def test_invalid_order_names_the_field(make_config: Callable[..., AgentConfig]) -> None:
    """A contract violation is refused at intake with the offending field."""
    async with EdgeAgent(make_config(http_enabled=False)) as agent:
        body = order_body("order-bad1")
        body["items"][0]["qty"] = 0
        with pytest.raises(InvalidOrder) as info:
            await agent.submit(body)
        assert info.value.field == "$.items[0].qty"
        assert await agent.get("order-bad1") is None
