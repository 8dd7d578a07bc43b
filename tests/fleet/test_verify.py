"""The simulator's verifier finds lost, duplicated, stuck and twice-processed orders in Redis."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from fleet.verify import EVENTS, OrderRef, verify
from pipeline._lua import Scripts
from pipeline.names import events_key, order_key
from pipeline.records import StreamEntry, Transition, commit, load, order_statuses
from schemas import Item, Order, encode
from schemas.names import shard_of, stream_key

SHARDS = 4


async def append(client: aioredis.Redis, ref: OrderRef) -> bytes:
    """Write a stream entry the way the bridge does; return its id."""
    device_id, order_id = ref
    entry_id = await client.xadd(
        stream_key(shard_of(device_id, SHARDS)),
        {"order_id": order_id, "device_id": device_id, "seq": 0, "received_at": 0, "payload": b""},
    )
    assert isinstance(entry_id, bytes)  # the client does not decode responses
    return entry_id


async def test_clean_run_passes_and_faults_are_named(redis_url: str) -> None:
    """A deleted entry is lost, an injected extra one duplicated, a status-less one stuck."""
    refs = [(f"dev-{i}", f"order-{i:04d}") for i in range(50)]
    async with aioredis.Redis.from_url(redis_url) as client:
        ids = [await append(client, ref) for ref in refs]
        clean = await verify(client, refs, shards=SHARDS)
        assert clean.ok
        assert (clean.checked, clean.lost, clean.duplicated) == (50, [], {})

        await client.xdel(stream_key(shard_of(refs[3][0], SHARDS)), ids[3])
        await append(client, refs[7])
        await append(client, ("rogue", "order-rogue"))

        async def statuses(present: list[OrderRef]) -> list[str | None]:
            return [None if ref == refs[9] else "fulfilled" for ref in present]

        verdict = await verify(client, refs, shards=SHARDS, statuses=statuses)
    assert not verdict.ok
    assert verdict.lost == [refs[3]]
    assert verdict.duplicated == {refs[7]: 2}
    assert verdict.stuck == [refs[9]]
    assert verdict.extra == 1


async def test_an_order_whose_device_never_heard_its_end_fails_the_run(redis_url: str) -> None:
    """In the streams once and terminal in the pipeline, but the device heard nothing: FAIL."""
    refs = [(f"dev-{i}", f"order-{i:04d}") for i in range(20)]
    async with aioredis.Redis.from_url(redis_url) as client:
        for ref in refs:
            await append(client, ref)
        everyone = await verify(client, refs, shards=SHARDS, heard=set(refs))
        assert everyone.ok
        assert everyone.unheard == []
        one_missing = await verify(client, refs, shards=SHARDS, heard=set(refs) - {refs[5]})
    assert not one_missing.ok
    assert one_missing.unheard == [refs[5]]
    assert (one_missing.lost, one_missing.duplicated) == ([], {})


def _order(ref: OrderRef) -> Order:
    device_id, order_id = ref
    item = Item(sku="COLA-33", qty=1, unit_price=150)
    return Order(v=1, order_id=order_id, device_id=device_id, seq=0, created_at=0,
                 currency="EUR", items=(item,), total=150)  # fmt: skip


async def process(client: aioredis.Redis, ref: OrderRef, *statuses: str) -> None:
    """Run one order through the pipeline's own load and commit, ending in ``statuses[-1]``."""
    order = _order(ref)
    entry = StreamEntry("orders:{0}", "1-1", {"received_at": b"1", "payload": encode(order)})
    scripts = Scripts()
    (ctx,) = await load(client, scripts, [(entry, order)], shards=SHARDS)
    for step, status in enumerate(statuses):
        ctx.proposed = Transition(status)
        ctx.settle(f"step-{step}")
    assert await commit(client, scripts, [ctx], shards=SHARDS) == [ctx]


async def test_stuck_and_twice_processed_orders_fail_the_run(redis_url: str) -> None:
    """Read from what the pipeline wrote: an order left short of an end is stuck; a record made
    twice, two terminal statuses in a history, or two terminal events each fail the run."""
    refs = [(f"dev-{i}", f"order-{i:04d}") for i in range(12)]
    stuck, remade, two_ends, two_events = refs[2], refs[4], refs[6], refs[8]
    async with aioredis.Redis.from_url(redis_url) as client:

        async def statuses(present: list[OrderRef]) -> list[str | None]:
            return await order_statuses(client, present, shards=SHARDS)

        for ref in refs:
            await append(client, ref)
            await process(client, ref, "validated", "reserved" if ref == stuck else "fulfilled")
        others = [ref for ref in refs if ref != stuck]
        clean = await verify(client, others, shards=SHARDS, statuses=statuses, pipeline_writes=True)
        assert clean.ok, clean
        with_stuck = await verify(client, refs, shards=SHARDS, statuses=statuses)
        assert not with_stuck.ok
        assert with_stuck.stuck == [stuck]  # and nothing else: stuck alone fails the run
        assert (with_stuck.lost, with_stuck.duplicated, with_stuck.unheard) == ([], {}, [])

        # The record vanishes and the order is processed again from scratch.
        await client.delete(order_key(*remade, SHARDS))
        await process(client, remade, "validated", "rejected")
        # A second consumer appends its own end without the compare-and-set.
        key = order_key(*two_ends, SHARDS)
        hn = int(await client.hget(key, "hn") or 0)
        end = json.dumps(["failed", "pay", "x", 1])
        await client.hset(key, mapping={f"h:{hn + 1}": end, "hn": hn + 1})
        # Only the events stream shows it: a second terminal event.
        device_id, order_id = two_events
        row = [order_id, device_id, "fulfilled", "pay", "", "fulfilled"]
        await client.xadd(events_key(shard_of(device_id, SHARDS)),
                          {"at": 1, "orders": json.dumps([row])})  # fmt: skip
        assert await order_statuses(client, [remade, two_ends], shards=SHARDS) == [
            "rejected",
            "fulfilled",
        ]
        without_records = await verify(client, others, shards=SHARDS, statuses=statuses)
        assert without_records.ok  # counting stream entries alone sees nothing wrong
        verdict = await verify(client, others, shards=SHARDS, statuses=statuses,
                               pipeline_writes=True)  # fmt: skip
    assert not verdict.ok
    assert (verdict.lost, verdict.duplicated, verdict.stuck, verdict.unheard) == ([], {}, [], [])
    assert sorted(verdict.processed_twice) == [remade, two_ends, two_events]
    assert "'received'" in verdict.processed_twice[remade]
    assert verdict.processed_twice[two_ends].startswith("history: 2 terminal statuses")
    assert verdict.processed_twice[two_events].startswith(f"{EVENTS}: 2 terminal")
