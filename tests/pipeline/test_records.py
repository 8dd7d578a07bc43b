"""The per-batch commit against real Redis: compare-and-set per order, one terminal state."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from pipeline._lua import Scripts
from pipeline.names import events_key, stock_key
from pipeline.records import StreamEntry, Transition, commit, load, load_order
from pipeline.stock import reserve
from schemas import encode
from tests.helpers import make_order

from .conftest import BACKENDS

SHARDS = 1
STOCK_KEY = stock_key(0)
EVENTS = events_key(0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_a_racing_consumer_stores_nothing_and_releases_nothing(
    aredis: aioredis.Redis, device_id: str
) -> None:
    """Two consumers settle one order from the same loaded state: the first commit wins,
    the second is marked stale and leaves record, history, events and stock untouched."""
    scripts = Scripts()
    await aredis.hset(STOCK_KEY, "A", 10)  # one shard: every device's stock is here
    order = make_order(device_id, 0, [("A", 3, 1)])
    entry = StreamEntry("orders:{0}", "1-1", {"received_at": b"1", "payload": encode(order)})
    first, second = await load(aredis, scripts, [(entry, order), (entry, order)], shards=SHARDS)
    assert await reserve(aredis, scripts, [first, second], shards=SHARDS) == ["reserved", "held"]
    for ctx, outcome in ((first, Transition("fulfilled")), (second, Transition("failed", "x"))):
        for step, proposed in (("reserve", Transition("reserved")), ("pay", outcome)):
            ctx.proposed = proposed
            ctx.settle(step)
    assert await commit(aredis, scripts, [first], shards=SHARDS) == [first]
    events = await aredis.xlen(EVENTS)
    assert await commit(aredis, scripts, [second], shards=SHARDS) == []
    assert second.stale
    record = await load_order(aredis, device_id, order.order_id, shards=SHARDS)
    assert record is not None
    assert record["status"] == "fulfilled"
    assert [h["status"] for h in record["history"]] == ["received", "reserved", "fulfilled"]
    assert await aredis.xlen(EVENTS) == events
    assert await aredis.hget(STOCK_KEY, "A") == b"7"  # reserved once, never released
    (again,) = await load(aredis, scripts, [(entry, order)], shards=SHARDS)
    assert (again.status, again.done) == ("fulfilled", {"reserve", "pay"})
    assert not again.dirty  # a redelivery has nothing left to store
