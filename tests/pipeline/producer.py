"""Test helper: stream entries exactly as the bridge writes them (contract v1), and orders."""

from __future__ import annotations

import redis.asyncio as aioredis

from schemas import Order, encode
from schemas.names import shard_of, stream_key
from servicekit.clock import now_ms
from servicekit.redis_clients import text


async def produce(client: aioredis.Redis, order: Order, shards: int) -> str:
    """XADD ``order`` to its shard stream with the bridge's fields; return the entry id."""
    return await produce_raw(
        client, order.device_id, order.order_id, order.seq, encode(order), shards=shards
    )


async def produce_raw(
    client: aioredis.Redis, device_id: str, order_id: str, seq: int, payload: bytes, *, shards: int
) -> str:
    """XADD any payload as the bridge would (for undecodable-entry tests)."""
    entry_id = await client.xadd(
        stream_key(shard_of(device_id, shards)),
        {
            "order_id": order_id,
            "device_id": device_id,
            "seq": seq,
            "received_at": now_ms(),
            "payload": payload,
        },
    )
    return text(entry_id)
