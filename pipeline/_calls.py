"""Running one script per shard of a batch: all calls in one pipeline, one round trip.

On a single Redis the calls share one connection's pipeline; on a Redis Cluster
redis-py's cluster pipeline splits them per node (each call's KEYS name one
slot). A call that meets NOSCRIPT (Redis restarted, failed over or never saw
the script) is sent again after SCRIPT LOAD; that repeat is safe because every
pipeline script is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from servicekit.redis_scripts import ScriptSet, is_noscript

AnyRedis = aioredis.Redis | RedisCluster
Call = tuple[Sequence[Any], Sequence[Any]]  # (keys, args)


def is_cluster(client: AnyRedis) -> bool:
    """True for a Redis Cluster client."""
    return isinstance(client, RedisCluster)


def call_plan(client: AnyRedis, shards: Sequence[int]) -> list[list[int]]:
    """The shards each script call covers: all of a batch's in one call on a single
    Redis; one per call on a cluster, where each call must stay in one slot."""
    if is_cluster(client):
        return [[shard] for shard in shards]
    return [list(shards)] if shards else []


async def run_calls(
    client: AnyRedis, scripts: ScriptSet, name: str, calls: Sequence[Call]
) -> list[Any]:
    """EVALSHA script ``name`` once per ``(keys, args)``; the replies in call order.

    Raises the first error other than NOSCRIPT (after the others ran).
    """
    if not calls:
        return []
    if len(calls) == 1:
        keys, args = calls[0]
        return [await scripts.run(client, name, keys, args)]
    replies = await _pipelined(client, scripts, name, calls)
    again = [i for i, r in enumerate(replies) if isinstance(r, Exception) and is_noscript(r)]
    if again:
        await scripts.load(client)
        retried = await _pipelined(client, scripts, name, [calls[i] for i in again])
        for i, reply in zip(again, retried, strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


async def _pipelined(
    client: AnyRedis, scripts: ScriptSet, name: str, calls: Sequence[Call]
) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            scripts.queue(pipe, name, keys, args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies
