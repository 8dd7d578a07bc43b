"""``order-pipeline layout set --shards N``: change the deployment's shard count.

Every key of a device's orders carries its shard's hash tag (pipeline/names.py,
schemas/names.py), so a new count moves keys. With the bridges stopped and
the old streams drained, this, in order:

1. marks the manifest ``changing_to: N`` (compare-and-set): from now on no
   service starts, and running ones stop at their next manifest check;
2. refuses while a bridge heartbeat is alive, an old stream holds an entry
   the pipeline has not acked, or stock is in transfer between shards
   (checked before step 1, so a refused change stops nothing, and again
   after it, putting the manifest back if one appeared meanwhile);
3. moves every device's keys to the device's new shard: the bridge's dedup
   markers (so a resend after the change is still answered ``duplicate``),
   the order records, the device indexes, the order-id indexes and the
   retention entries (TTLs kept); spreads the stock over the new shards;
4. writes the manifest with ``shards: N``.

Each step is idempotent, so a change that stopped half way (a crash, a lost
connection) is finished by running the command again; services refuse to
start until it is. The stock totals are saved before the stock is spread
(``deployment:layout-change``), so a second run never counts them twice.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Final

import structlog

from schemas.names import BRIDGES_KEY, MANIFEST_KEY, PIPELINE_GROUP, bridge_key, shard_of
from schemas.names import stream_key as orders_stream
from servicekit import layout
from servicekit.redis_clients import text

from ._calls import AnyRedis
from .names import CATALOG_META_KEY, retention_key, stock_key, transfers_key
from .stock import stock_levels, store_stock

log = structlog.get_logger(__name__)

CHANGE_KEY: Final = "deployment:layout-change"  # the saved stock totals of a change
SETTLE_S: Final = layout.WATCH_INTERVAL_S + 1.0
STALE_BEATS: Final = 3  # a replica that missed this many beats has stopped
CLOCK_SLACK_MS: Final = 2000  # beats carry the bridge's clock, the age is Redis's


class ReshardRefused(layout.LayoutError):
    """The shard count cannot change now (bridges running, streams not drained, …)."""


@dataclass
class Moved:
    """What a change moved, by kind of key."""

    keys: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skus: int = 0


async def live_bridges(client: AnyRedis) -> list[str]:
    """Bridge replicas that beat within their last three intervals (plus clock slack).

    A stopped replica's hash outlives it (its TTL is six beats), so its age,
    not its existence, says whether it still runs.
    """
    members: Any = await client.zrange(BRIDGES_KEY, 0, -1)
    ids = [text(raw) for raw in members]
    seconds, micros = await client.time()
    now = seconds * 1000 + micros // 1000
    live = []
    for client_id in ids:
        beat: Any = await client.hmget(bridge_key(client_id), ["at", "interval_ms"])
        if beat[0] is None:
            continue
        interval_ms = int(beat[1] or 5000)
        if now - int(beat[0]) <= STALE_BEATS * interval_ms + CLOCK_SLACK_MS:
            live.append(client_id)
    return live


async def undrained(client: AnyRedis, shards: int) -> list[str]:
    """Old shard streams with entries the pipeline has not read or not acked."""
    found = []
    for shard in range(shards):
        key = orders_stream(shard)
        if not await client.exists(key):
            continue
        info: Any = await client.xinfo_stream(key)
        last = text(info["last-generated-id"])
        groups: Any = await client.xinfo_groups(key)
        group = next((g for g in groups if text(g["name"]) == PIPELINE_GROUP), None)
        if info["length"] and group is None:
            found.append(f"{key} (no {PIPELINE_GROUP} group)")
        elif group is not None and (
            group["pending"] or (text(group["last-delivered-id"]) != last and info["length"])
        ):
            found.append(f"{key} (pending {group['pending']})")
    return found


async def in_transfer(client: AnyRedis, shards: int) -> int:
    """Stock transfers between shards not yet settled."""
    return sum([await client.zcard(transfers_key(shard)) for shard in range(shards)])


async def _move(client: AnyRedis, old: str, new: str) -> bool:
    """Copy ``old`` to ``new`` with its TTL (DUMP/RESTORE), then delete ``old``."""
    payload = await client.dump(old)
    if payload is None:
        return False
    ttl = await client.pttl(old)
    if ttl == -2:
        return False
    await client.restore(new, max(ttl, 0), payload, replace=True)
    await client.delete(old)
    return True


async def _scan(client: AnyRedis, pattern: str) -> list[str]:
    return [text(key) async for key in client.scan_iter(match=pattern, count=1000)]


async def move_device_keys(client: AnyRedis, old_shards: int, shards: int, moved: Moved) -> None:
    """Dedup markers, records and device indexes: each to its device's new shard."""
    # (pattern, index of the shard tag, index of the device id) in the key's ':' parts.
    kinds = {
        "seen": ("orders:{{{s}}}:seen:*", 3),
        "record": ("order:{{{s}}}:*", 2),
        "device_index": ("device:{{{s}}}:*:orders", 2),
    }
    for kind, (pattern, device_at) in kinds.items():
        for shard in range(old_shards):
            for key in await _scan(client, pattern.format(s=shard)):
                parts = key.split(":")
                target = shard_of(parts[device_at], shards)
                if target == shard:
                    continue
                parts[1] = f"{{{target}}}"
                if await _move(client, key, ":".join(parts)):
                    moved.keys[kind] += 1


async def move_order_id_index(client: AnyRedis, old_shards: int, shards: int, moved: Moved) -> None:
    """``order-id:{N}:{order_id}:devices``: each member device to its new shard's set."""
    for shard in range(old_shards):
        for key in await _scan(client, f"order-id:{{{shard}}}:*:devices"):
            ttl = await client.pttl(key)
            for raw in await client.smembers(key):
                device = text(raw)
                target = shard_of(device, shards)
                if target == shard:
                    continue
                parts = key.split(":")
                parts[1] = f"{{{target}}}"
                new = ":".join(parts)
                await client.sadd(new, device)
                if ttl > 0:
                    await client.pexpire(new, ttl)
                await client.srem(key, device)
                moved.keys["order_id_index"] += 1


async def move_retention(client: AnyRedis, old_shards: int, shards: int, moved: Moved) -> None:
    """Retention entries ``now:[[device, member], …]``: split by the devices' new shards."""
    for shard in range(old_shards):
        key = retention_key(shard)
        rows: Any = await client.zrange(key, 0, -1, withscores=True)
        for raw, score in rows:
            member = text(raw)
            stamp, _, body = member.partition(":")
            groups: dict[int, list[Any]] = defaultdict(list)
            for pair in json.loads(body):
                groups[shard_of(pair[0], shards)].append(pair)
            if set(groups) == {shard}:
                continue
            for target, pairs in groups.items():
                encoded = f"{stamp}:{json.dumps(pairs, separators=(',', ':'))}"
                await client.zadd(retention_key(target), {encoded: score})
            await client.zrem(key, member)
            moved.keys["retention"] += 1


async def move_stock(client: AnyRedis, old_shards: int, shards: int, moved: Moved) -> None:
    """Spread each SKU's units over the new shards, from totals saved once per change."""
    saved = await client.get(CHANGE_KEY)
    if saved is None:
        totals = await stock_levels(client, old_shards)
        await client.set(CHANGE_KEY, json.dumps({"to": shards, "stock": totals}), nx=True)
        saved = await client.get(CHANGE_KEY)
    totals = json.loads(text(saved or b"{}"))["stock"]
    await store_stock(client, totals, shards)
    for shard in range(shards, old_shards):
        await client.delete(stock_key(shard))
    if await client.exists(CATALOG_META_KEY):
        await client.hset(CATALOG_META_KEY, "shards", shards)
    moved.skus = len(totals)


async def set_shards(client: AnyRedis, shards: int, *, settle_s: float = SETTLE_S) -> Moved:
    """Change the deployment to ``shards`` shards (see the module's docstring).

    Raises:
        ReshardRefused: bridges alive, streams not drained, stock in transfer, or no manifest.
        LayoutError: the manifest is unreadable or changed meanwhile.
    """
    raw, current = await layout.read(client)
    if current is None:
        raise ReshardRefused(
            f"no deployment manifest ({MANIFEST_KEY}): start the services once with "
            f"--shards {shards} instead, nothing needs moving"
        )
    if current.changing_to and current.changing_to != shards:
        raise ReshardRefused(
            f"a change to {current.changing_to} shards is in progress: finish it with "
            f"`order-pipeline layout set --shards {current.changing_to}` first"
        )
    if current.shards == shards and not current.changing_to:
        return Moved()
    stable = replace(current, changing_to=0)
    if not current.changing_to:
        if problems := await _problems(client, current.shards):  # refuse before anything stops
            raise _refused(current.shards, shards, problems)
        if not await layout.swap(client, raw, replace(current, changing_to=shards)):
            raise layout.LayoutError(f"{MANIFEST_KEY} changed meanwhile: run the command again")
        log.info("layout_change_started", shards=current.shards, to=shards)
        await asyncio.sleep(settle_s)  # running services notice the change and stop
    problems = await _problems(client, current.shards)
    if problems:
        _, now = await layout.read(client)
        if now is not None and now.changing_to == shards and not await client.exists(CHANGE_KEY):
            await layout.swap(client, now.encode(), stable)  # nothing moved yet: back as it was
        raise _refused(current.shards, shards, problems)
    moved = Moved()
    await move_stock(client, current.shards, shards, moved)
    await move_device_keys(client, current.shards, shards, moved)
    await move_order_id_index(client, current.shards, shards, moved)
    await move_retention(client, current.shards, shards, moved)
    done = layout.Manifest(shards, current.regions, current.contract)
    if not await layout.swap(client, replace(current, changing_to=shards).encode(), done):
        raise layout.LayoutError(f"{MANIFEST_KEY} changed meanwhile: run the command again")
    await client.delete(CHANGE_KEY)
    log.info("layout_changed", shards=shards, moved=dict(moved.keys), skus=moved.skus)
    return moved


def _refused(old_shards: int, shards: int, problems: list[str]) -> ReshardRefused:
    return ReshardRefused(
        f"cannot change from {old_shards} to {shards} shards: "
        + "; ".join(problems)
        + " (docs/how-to/change-shards.md)"
    )


async def _problems(client: AnyRedis, old_shards: int) -> list[str]:
    problems = []
    if bridges := await live_bridges(client):
        problems.append(f"bridges still running (stop them first): {', '.join(bridges)}")
    if streams := await undrained(client, old_shards):
        problems.append(
            "streams not drained (let the pipeline finish them, then stop it): "
            + ", ".join(streams)
        )
    if transfers := await in_transfer(client, old_shards):
        problems.append(f"{transfers} stock transfers in flight (let the workers settle them)")
    return problems
