"""Running one script per shard of a batch: all calls in one pipeline, one round trip.

On a single Redis the calls share one connection's pipeline; on a Redis Cluster
redis-py's cluster pipeline splits them per node (each call's KEYS name one
slot). A call that meets NOSCRIPT (Redis restarted, failed over or never saw
the script) is sent again after SCRIPT LOAD; that repeat is safe because every
pipeline script is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from schemas import Order
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


@runtime_checkable
class Rider(Protocol):
    """Reads that travel in the same pipeline as a batch's script calls (one round trip).

    A step implements it to have its Redis reads sent with the batch's load
    (:func:`pipeline.records.load`) instead of in a round trip of its own.
    """

    def queue_reads(self, pipe: Any, orders: Sequence[Order]) -> int:
        """Queue the reads this batch of ``orders`` needs on ``pipe``; return how many."""
        ...

    def take_reads(self, replies: Sequence[Any]) -> None:
        """Their replies, in order (kept for the step's next run)."""
        ...


async def run_calls_with(
    client: AnyRedis, scripts: ScriptSet, name: str, calls: Sequence[Call], *,
    riders: Sequence[Rider], orders: Sequence[Order],
) -> list[Any]:  # fmt: skip
    """:func:`run_calls`, with each rider's reads in the same pipeline; the scripts' replies.

    On NOSCRIPT the scripts are loaded and the whole pipeline sent once more
    (the riders only read, so that is safe too).
    """
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                scripts.queue(pipe, name, keys, args)
            counts = [rider.queue_reads(pipe, orders) for rider in riders]
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        ours = replies[: len(calls)]
        if attempt == 0 and any(isinstance(r, Exception) and is_noscript(r) for r in ours):
            await scripts.load(client)
            continue
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        at = len(calls)
        for rider, count in zip(riders, counts, strict=True):
            rider.take_reads(replies[at : at + count])
            at += count
        return ours
    raise AssertionError("unreachable")  # pragma: no cover


async def _pipelined(
    client: AnyRedis, scripts: ScriptSet, name: str, calls: Sequence[Call]
) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            scripts.queue(pipe, name, keys, args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    return replies
