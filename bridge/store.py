"""Redis side of the bridge: one pipelined round trip per batch.

A batch becomes one ``EVAL`` of the dedup + append script per shard plus one
``XADD orders:dlq`` per dead letter, all sent in one pipeline (redis-py's
cluster pipeline splits it per node on a Redis Cluster; the shard's hash tag
keeps each script call on one slot).

redis-py's own retries are switched off: the batcher retries whole batches
itself. The script is idempotent; DLQ entries are at-least-once (a batch
retried after a lost reply may write a dead letter twice, never zero times).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from enum import IntEnum
from types import TracebackType
from typing import Any, Final, Protocol, Self

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from schemas.names import DLQ_STREAM, seen_key, stream_key

from ._script import APPEND_SCRIPT
from .errors import StoreError
from .ingest import DeadLetter, ValidOrder

_encoder: Final = msgspec.msgpack.Encoder()


class AppendResult(IntEnum):
    """What the script did with one order."""

    CONFLICT = -1
    DUPLICATE = 0
    APPENDED = 1


class OrderSink(Protocol):
    """Where batches go. The Redis implementation is :class:`RedisSink`."""

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        """Store one batch; return one result per order, in order.

        Raises:
            StoreError: nothing is known to be stored; the caller retries.
        """
        ...

    async def ping(self) -> float:
        """One round trip; returns its duration in seconds. Raises StoreError."""
        ...


class RedisSink:
    """:class:`OrderSink` on a single Redis or a Redis Cluster (async context manager)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        dedup_ttl_s: int,
        dlq_maxlen: int,
        timeout_s: float = 5.0,
    ) -> None:
        self._ttl = str(dedup_ttl_s)
        self._dlq_maxlen = dlq_maxlen
        no_retry = Retry(NoBackoff(), 0)
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": no_retry,
        }
        self._client: aioredis.Redis | RedisCluster
        if cluster:
            self._client = RedisCluster.from_url(url, **kwargs)
        else:
            self._client = aioredis.Redis.from_url(url, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def ping(self) -> float:
        start = time.perf_counter()
        try:
            await self._client.ping()
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreError(f"redis ping failed: {exc!r}") from exc
        return time.perf_counter() - start

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for index, order in enumerate(orders):
            by_shard[order.shard].append(index)
        pipe = self._client.pipeline(transaction=False)
        shard_order = list(by_shard)
        for shard in shard_order:
            group = [orders[index] for index in by_shard[shard]]
            keys = [stream_key(shard)] + [seen_key(shard, o.device_id, o.order_id) for o in group]
            meta = _encoder.encode(
                [
                    (
                        o.digest,
                        o.order_id,
                        o.device_id,
                        str(o.seq),
                        str(o.received_at_ms),
                        len(o.payload),
                    )
                    for o in group
                ]
            )
            payloads = b"".join(o.payload for o in group)
            trim = "1" if shard in trim_shards else "0"
            pipe.eval(APPEND_SCRIPT, len(keys), *keys, self._ttl, trim, meta, payloads)
        for letter in dead:
            pipe.xadd(
                DLQ_STREAM,
                {
                    "reason": letter.reason,
                    "topic": letter.topic,
                    "payload": letter.payload,
                    "received_at": letter.received_at_ms,
                },
                maxlen=self._dlq_maxlen,
                approximate=True,
            )
        try:
            replies = await pipe.execute(raise_on_error=True)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise StoreError(f"redis batch failed: {exc!r}") from exc
        results: list[AppendResult] = [AppendResult.CONFLICT] * len(orders)
        for shard, reply in zip(shard_order, replies, strict=False):
            for index, code in zip(by_shard[shard], reply, strict=True):
                results[index] = AppendResult(int(code))
        return results
