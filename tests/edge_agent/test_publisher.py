"""Publisher flow control: bounded in-flight window, oldest first, jittered backoff, pacing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from edge_agent import AgentConfig, EdgeAgent
from servicekit.backoff import full_jitter
from servicekit.rate_limit import TokenBucket
from tests.helpers import wait_until

from .bridge_double import BridgeDouble
from .conftest import order_body


async def test_window_bounds_unreceipted_orders_and_sends_oldest_first(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """With no receipts coming, only ``max_inflight`` orders go out, and they are the oldest."""
    config = make_config(max_inflight=5, receipt_timeout_s=60, http_enabled=False)
    with BridgeDouble(mqtt_url, lambda _oid, _n: None) as double:
        async with EdgeAgent(config) as agent:
            ids = [f"window-{i:04d}" for i in range(30)]
            for order_id in ids:
                await agent.submit(order_body(order_id))

            async def five_seen() -> bool:
                return len(double.ids() & set(ids)) >= 5

            await wait_until(five_seen, 20, "the first window")
            await asyncio.sleep(0.5)  # several poll intervals: more would have gone out by now
            assert double.ids() & set(ids) == set(ids[:5])
            assert agent.publisher.inflight == 5


async def test_backlog_drains_at_the_configured_rate(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """A paced backlog does not go out in one burst, yet keeps flowing (not one per interval)."""
    config = make_config(drain_rate_per_min=600.0, max_inflight=100, http_enabled=False)
    ids = [f"drain-{i:04d}" for i in range(40)]
    with BridgeDouble(mqtt_url) as double:
        async with EdgeAgent(config) as agent:
            for order_id in ids:
                await agent.submit(order_body(order_id))

            async def some() -> bool:
                return len(double.ids() & set(ids)) >= 5

            await wait_until(some, 20, "drain started")
            # 10/s with a bucket of one second's worth: the 40 cannot all be out at once...
            burst = len(double.ids() & set(ids))
            assert burst < len(ids)
            # ...and they all arrive well before one-per-poll-interval pacing would manage.
            missing = await asyncio.to_thread(double.wait_for, set(ids), 30)
            assert not missing


def test_full_jitter_stays_in_its_window() -> None:
    """Full jitter draws in [0, min(cap, base * 2^n)] and actually spreads its draws."""
    rng = random.Random(1234)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        draws = [full_jitter(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling / 2


def test_token_bucket_paces_and_refunds() -> None:
    """The bucket hands out at most its burst at once and takes unused tokens back."""
    bucket = TokenBucket(rate_per_s=1.0, burst=10)
    assert bucket.take_up_to(50) == 10
    assert bucket.take_up_to(5) == 0
    bucket.give_back(3)
    assert bucket.take_up_to(5) == 3
    assert bucket.seconds_until(1) > 0
