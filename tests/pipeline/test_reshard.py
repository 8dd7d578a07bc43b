"""``layout set`` (pipeline/reshard.py) on a real Redis: its refusals and its resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pipeline.names import order_key, stock_key
from pipeline.reshard import CHANGE_KEY, ReshardRefused, set_shards
from schemas.names import MANIFEST_KEY, PIPELINE_GROUP, seen_key, shard_of, stream_key
from servicekit.layout import LayoutChanging, Manifest, agree


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Any]:
    async with aioredis.Redis.from_url(redis_url) as connection:
        yield connection


def moving_device(old: int, new: int) -> str:
    """A device whose shard differs between the two counts."""
    return next(
        d for d in (f"dev-m{i}" for i in range(1000)) if shard_of(d, old) != shard_of(d, new)
    )


async def test_an_undrained_stream_refuses_and_touches_nothing(client: Any) -> None:
    """An entry nobody acked: refused, the manifest and the marker stay as they were."""
    await client.set(MANIFEST_KEY, Manifest(4).encode())
    device = moving_device(4, 8)
    shard = shard_of(device, 4)
    await client.xgroup_create(stream_key(shard), PIPELINE_GROUP, id="0", mkstream=True)
    await client.xadd(stream_key(shard), {"device_id": device, "order_id": "o-1"})
    await client.set(seen_key(shard, device, "o-1"), "digest")
    with pytest.raises(ReshardRefused, match=r"streams not drained.*orders:\{\d\}"):
        await set_shards(client, 8, settle_s=0)
    assert await client.get(MANIFEST_KEY) == Manifest(4).encode().encode()
    assert await client.exists(seen_key(shard, device, "o-1")) == 1


async def test_a_change_that_stopped_half_way_is_finished_by_running_it_again(
    client: Any,
) -> None:
    """Manifest left at changing_to (a crash): services refuse; a second run moves the marker
    (TTL kept) and the record, keeps the saved stock totals, and ends at 8 shards."""
    device = moving_device(4, 8)
    old, new = shard_of(device, 4), shard_of(device, 8)
    await client.set(MANIFEST_KEY, Manifest(4, changing_to=8).encode())
    await client.set(seen_key(old, device, "o-1"), "digest", ex=3600)
    await client.hset(order_key(device, "o-1", 4), mapping={"status": "fulfilled"})
    await client.hset(stock_key(0), mapping={"COLA-33": 7})  # the rest moved already:
    await client.set(CHANGE_KEY, '{"to": 8, "stock": {"COLA-33": 40}}')
    with pytest.raises(LayoutChanging, match="being changed from 4 to 8"):
        await agree(client, service="t", where="here", shards=4, shards_given=False)

    await set_shards(client, 8, settle_s=0)

    assert Manifest.decode(await client.get(MANIFEST_KEY)).shards == 8
    assert await client.exists(seen_key(old, device, "o-1")) == 0
    assert await client.get(seen_key(new, device, "o-1")) == b"digest"
    assert 0 < await client.ttl(seen_key(new, device, "o-1")) <= 3600
    assert await client.hget(order_key(device, "o-1", 8), "status") == b"fulfilled"
    parts = [int(await client.hget(stock_key(s), "COLA-33") or 0) for s in range(8)]
    assert sum(parts) == 40
    assert await client.exists(CHANGE_KEY) == 0


async def test_without_a_manifest_or_to_the_same_count(client: Any) -> None:
    """No manifest: refused (nothing to move). The current count: nothing done."""
    with pytest.raises(ReshardRefused, match="no deployment manifest"):
        await set_shards(client, 8, settle_s=0)
    await client.set(MANIFEST_KEY, Manifest(8).encode())
    moved = await set_shards(client, 8, settle_s=0)
    assert dict(moved.keys) == {}
