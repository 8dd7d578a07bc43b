"""``order-pipeline migrate``: move a Redis from the layout before Redis Cluster support.

Before, the pipeline kept one stock hash ``pipeline:stock``, untagged per-order
keys (``order:{device}:{order}`` plus ``:history`` and ``:reservation``),
untagged indexes and one retention index. This moves, on a single Redis (the
old layout never ran on a cluster), with the workers stopped:

1. stock: each SKU's units are added to the shards' parts (spread evenly) and
   ``pipeline:stock`` is renamed to ``pipeline:stock:migrated``, so the units
   move once even if the command runs again;
2. each record: its fields, history list and reservation become one record in
   its shard's slot (TTL kept), indexed in the device and order-id indexes;
   the old keys and index entries are deleted; a terminal order with a TTL
   gets a retention entry. Records already moved are skipped, so a migration
   that stopped half way is simply run again.

``orders:events`` (capped) and ``pipeline:retention`` are left as they were:
nothing reads them any more; delete them when their history no longer matters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis

from schemas.names import shard_of
from servicekit.clock import now_ms
from servicekit.redis_clients import text

from .names import (
    LEGACY_STOCK_KEY,
    TERMINAL_STATUSES,
    device_index_key,
    order_devices_key,
    order_key,
    retention_key,
    stock_key,
)
from .records import index_member
from .stock import split

MIGRATED_STOCK_KEY: Final = "pipeline:stock:migrated"
_FIXED: Final = ("order_id", "device_id", "seq", "received_at", "total", "currency", "stream",
                 "entry_id", "status", "reason", "updated_at", "last_error")  # fmt: skip


@dataclass
class Migrated:
    """What one run moved."""

    skus: int = 0
    orders: int = 0


async def migrate(client: aioredis.Redis, shards: int) -> Migrated:
    """Move stock and records to the shard-tagged layout (idempotent)."""
    done = Migrated()
    old_stock: Any = await client.hgetall(LEGACY_STOCK_KEY)
    if old_stock:
        async with client.pipeline(transaction=True) as pipe:
            for raw_sku, raw_units in old_stock.items():
                for shard, share in enumerate(split(int(raw_units), shards)):
                    if share:
                        pipe.hincrby(stock_key(shard), text(raw_sku), share)
            pipe.rename(LEGACY_STOCK_KEY, MIGRATED_STOCK_KEY)
            await pipe.execute()
        done.skus = len(old_stock)
    async for raw_key in client.scan_iter(match="order:*", count=1000):
        key = text(raw_key)
        if "{" in key or key.endswith((":history", ":reservation")) or key.count(":") != 2:
            continue
        if await _move(client, key, shards):
            done.orders += 1
    return done


async def _move(client: aioredis.Redis, key: str, shards: int) -> bool:
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(key)
        pipe.lrange(f"{key}:history", 0, -1)
        pipe.hgetall(f"{key}:reservation")
        pipe.pttl(key)
        raw, history, reservation, ttl_ms = await pipe.execute()
    record = {text(k): text(v) for k, v in raw.items()}
    if "status" not in record:
        return False
    device_id, order_id = record["device_id"], record["order_id"]
    shard = shard_of(device_id, shards)
    fields: dict[str, str] = {name: record[name] for name in _FIXED if name in record}
    items = json.loads(record.get("items", "[]"))
    fields["items"] = msgspec.json.encode([[i["sku"], i["qty"], i["unit_price"]]
                                           for i in items]).decode()  # fmt: skip
    fields["created"] = record.get("created", record.get("updated_at", "0"))
    fields["steps"] = ",".join(sorted(k[5:] for k in record if k.startswith("done:")))
    for n, line in enumerate(history, 1):
        change = json.loads(line)
        fields[f"h:{n}"] = msgspec.json.encode(
            [change["status"], change["step"], change["reason"], change["at"]]
        ).decode()
    fields["hn"] = str(len(history))
    held = {text(k): text(v) for k, v in reservation.items()}
    if "_state" in held:
        fields["res"] = held["_state"]
        fields.update({f"res:{k[2:]}": v for k, v in held.items() if k.startswith("s:")})
    new_key = order_key(device_id, order_id, shards)
    member = index_member(int(record["seq"]), order_id)
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(new_key, mapping=fields)  # type: ignore[arg-type]
        if ttl_ms > 0:
            pipe.pexpire(new_key, ttl_ms)
            if record["status"] in TERMINAL_STATUSES:
                ended = json.dumps([[device_id, member]], separators=(",", ":"))
                pipe.zadd(retention_key(shard), {f"{now_ms()}:{ended}": now_ms() + ttl_ms})
        pipe.zadd(device_index_key(device_id, shards), {member: 0})
        pipe.sadd(order_devices_key(order_id, shard), device_id)
        pipe.delete(key, f"{key}:history", f"{key}:reservation")
        pipe.zrem(f"device:{device_id}:orders", member)
        pipe.srem(f"order-id:{order_id}:devices", device_id)
        await pipe.execute()
    return True
