"""Stock reservation against real Redis: all-or-nothing, idempotent per order, released once."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline._lua import Scripts
from pipeline.names import order_key, stock_key
from pipeline.records import OrderContext, StreamEntry, Transition, commit, load
from pipeline.stock import reserve
from schemas import encode
from testrig.servers import RedisProcess
from tests.helpers import make_order

from .conftest import BACKENDS

SKUS = ("A", "B", "C")
SHARDS = 1  # every device's stock in shard 0's hash (rebalancing: test_stock_shards.py)
STOCK_KEY = stock_key(0)


async def new_context(
    client: aioredis.Redis, scripts: Scripts, items: list[tuple[str, int]]
) -> OrderContext:
    """An admitted order with these (sku, qty) lines, in state ``validated``."""
    order = make_order(
        "stock-dev", 0, [(sku, qty, 1) for sku, qty in items], order_id=uuid.uuid4().hex
    )
    entry = StreamEntry("orders:{0}", "1-1", {"received_at": b"1", "payload": encode(order)})
    (ctx,) = await load(client, scripts, [(entry, order)], shards=SHARDS)
    ctx.proposed = Transition("validated")
    ctx.settle("validate")
    assert await commit(client, scripts, [ctx], shards=SHARDS) == [ctx]
    (ctx,) = await load(client, scripts, [(entry, order)], shards=SHARDS)
    return ctx


async def step(
    client: aioredis.Redis, scripts: Scripts, ctx: OrderContext, name: str, proposed: Transition
) -> OrderContext:
    """Store one step's decision as a worker batch would (from freshly loaded state)."""
    (fresh,) = await load(client, scripts, [(ctx.entry, ctx.order)], shards=SHARDS)
    if name not in fresh.done:
        fresh.proposed = proposed
        fresh.settle(name)
    await commit(client, scripts, [fresh], shards=SHARDS)
    return fresh


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_reserve_is_all_or_nothing_and_idempotent(aredis: aioredis.Redis) -> None:
    """A short line reserves nothing; a repeated reservation takes stock once."""
    scripts = Scripts()
    await aredis.hset(STOCK_KEY, mapping={"A": 5, "B": 1})
    short = await new_context(aredis, scripts, [("A", 2), ("B", 2)])
    assert await reserve(aredis, scripts, [short], shards=SHARDS) == ["short:B=1"]
    assert await aredis.hmget(STOCK_KEY, ["A", "B"]) == [b"5", b"1"]
    ok = await new_context(aredis, scripts, [("A", 2), ("A", 1), ("B", 1)])
    assert await reserve(aredis, scripts, [ok, ok], shards=SHARDS) == ["reserved", "held"]
    assert await reserve(aredis, scripts, [ok], shards=SHARDS) == ["held"]
    assert await aredis.hmget(STOCK_KEY, ["A", "B"]) == [b"2", b"0"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
async def test_failing_releases_once_and_never_reserves_again(aredis: aioredis.Redis) -> None:
    """Entering `failed` gives the stock back atomically, once; a late reserve is refused."""
    scripts = Scripts()
    await aredis.hset(STOCK_KEY, "A", 10)
    ctx = await new_context(aredis, scripts, [("A", 4)])
    await reserve(aredis, scripts, [ctx], shards=SHARDS)
    await step(aredis, scripts, ctx, "reserve", Transition("reserved"))
    for _ in range(2):  # the second commit is a redelivery: already done, no second release
        await step(aredis, scripts, ctx, "pay", Transition("failed", "payment_declined"))
    assert await aredis.hget(STOCK_KEY, "A") == b"10"
    assert (
        await aredis.hget(order_key(ctx.order.device_id, ctx.order.order_id, SHARDS), "res")
        == b"released"
    )
    assert await reserve(aredis, scripts, [ctx], shards=SHARDS) == ["released"]
    assert await aredis.hget(STOCK_KEY, "A") == b"10"


ops = st.lists(
    st.tuples(
        st.lists(st.tuples(st.sampled_from(SKUS), st.integers(1, 4)), min_size=1, max_size=3),
        st.integers(1, 3),  # how often the reservation is delivered
        st.sampled_from(["keep", "fail", "reject"]),
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.usefixtures("redis_url")
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops, initial=st.integers(0, 8))
def test_stock_never_negative_and_balances(
    redis_server: RedisProcess, ops: list[tuple[list[tuple[str, int]], int, str]], initial: int
) -> None:
    """Any mix of orders, redeliveries and failures: stock ≥ 0 and = initial − Σ held quantities."""
    url = redis_server.url

    async def scenario() -> None:
        client = aioredis.Redis.from_url(url)
        scripts = Scripts()
        try:
            await client.delete(STOCK_KEY)
            await client.hset(STOCK_KEY, mapping=dict.fromkeys(SKUS, initial))
            held: dict[str, int] = dict.fromkeys(SKUS, 0)
            for items, deliveries, ending in ops:
                ctx = await new_context(client, scripts, items)
                results = [
                    r
                    for _ in range(deliveries)
                    for r in await reserve(client, scripts, [ctx], shards=SHARDS)
                ]
                assert results.count("reserved") <= 1
                if "reserved" in results:
                    await step(client, scripts, ctx, "reserve", Transition("reserved"))
                    if ending == "keep":
                        for sku, qty in items:
                            held[sku] += qty
                    else:
                        ending_status = "failed" if ending == "fail" else "rejected"
                        await step(client, scripts, ctx, "pay", Transition(ending_status, "x"))
                for sku in SKUS:
                    left = int(await client.hget(STOCK_KEY, sku) or 0)
                    assert left >= 0
                    assert left == initial - held[sku]
        finally:
            await client.aclose()

    asyncio.run(scenario())
