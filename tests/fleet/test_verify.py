"""The simulator's verifier finds lost, duplicated and stuck orders in real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from fleet.verify import OrderRef, verify
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
