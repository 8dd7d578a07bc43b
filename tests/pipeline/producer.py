"""Test helper: stream entries exactly as the bridge writes them (contract v1), and orders."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis

from schemas import Item, Order, encode
from schemas.names import shard_of, stream_key
from servicekit.clock import now_ms
from servicekit.redis_clients import text


def make_order(
    device_id: str,
    seq: int,
    items: Sequence[tuple[str, int, int]] = (("COLA-33", 1, 150),),
    *,
    order_id: str | None = None,
    currency: str = "EUR",
) -> Order:
    """A valid v1 order with the given ``(sku, qty, unit_price)`` lines."""
    lines = tuple(Item(sku, qty, price) for sku, qty, price in items)
    return Order(
        v=1,
        order_id=order_id or uuid.uuid4().hex,
        device_id=device_id,
        seq=seq,
        created_at=now_ms(),
        currency=currency,
        items=lines,
        total=sum(i.qty * i.unit_price for i in lines),
    )


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
