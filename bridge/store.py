"""Redis side of the bridge: one pipelined round trip per batch.

A batch becomes one ``EVALSHA`` of the dedup + append script per shard plus one
``XADD orders:dlq`` per dead letter, all sent in one pipeline (redis-py's
cluster pipeline splits it per node on a Redis Cluster; the shard's hash tag
keeps each script call on one slot). The script runs by SHA1
(:class:`servicekit.redis_scripts.ScriptSet`); after a Redis restart the batch
answers NOSCRIPT, the script is loaded again and the batch sent again.

The batch travels over up to ``lanes`` connections at once (shards spread
over them), so that Redis reads it in one event-loop turn and, with
``appendfsync always``, fsyncs it once.

With ``min_replicas`` > 0 a fence write plus ``WAIT min_replicas timeout``
follow on one connection: the batch counts as written only once that many
replicas hold it (:class:`ReplicasShortfall` otherwise).

redis-py's own retries are switched off: the batcher retries whole batches
itself. The script is idempotent; DLQ entries are at-least-once (a batch
retried after a lost reply may write a dead letter twice, never zero times).

:meth:`RedisSink.inspect` reads what the bridge reports about Redis itself:
durability (INFO persistence, CONFIG GET where the ACL allows) and memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import TracebackType
from typing import Any, Final, Protocol, Self

import msgspec
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
)

from schemas import MAX_ORDER_BYTES
from schemas.names import DLQ_STREAM, seen_key, stream_key
from servicekit.redis_clients import connect, error_code, text
from servicekit.redis_scripts import ScriptSet, is_noscript

from ._script import APPEND_SCRIPT
from .dlq_budget import MAX_TOPIC_CHARS
from .errors import RedisAuthError, RedisFullError, ReplicasShortfall, StoreError
from .ingest import DeadLetter, ValidOrder

_encoder: Final = msgspec.msgpack.Encoder()
_FAILURES: Final = (RedisError, RedisClusterException, OSError)
FENCE_KEY: Final = "orders:wait-fence"  # in the bridge ACL user's ~orders:* keyspace
_MAX_FENCE_TAGS: Final = 1_000_000  # a slot per tag, spread evenly: a few dozen suffice


def store_error(exc: BaseException, what: str) -> StoreError:
    """The StoreError for a failed Redis call, typed by what Redis said."""
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return RedisAuthError(f"redis refused our credentials during {what}: {exc}")
    if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):
        return RedisFullError(f"redis is at maxmemory during {what}: {exc}")
    # redis-py's repr names the class only ("server:ResponseError"); the code says why
    # (NOREPLICAS: a master with fewer replicas than its min-replicas-to-write).
    code = error_code(exc)
    return StoreError(f"{what} failed: {exc!r}" + (f" {code}" if code else ""))


@dataclass(frozen=True, slots=True)
class RedisState:
    """What the bridge knows about the Redis it writes to.

    ``durable`` is True when the AOF is on and fsynced before every reply
    (``appendfsync always``); None when the ACL hides ``appendfsync`` (CONFIG
    GET) or INFO (the operator vouches for it with ``--redis-assume-fsync-always``).
    """

    aof_enabled: bool | None  # None: INFO not allowed
    appendfsync: str | None  # None: CONFIG GET not allowed
    durable: bool | None
    used_memory: int
    maxmemory: int

    @property
    def full(self) -> bool:
        """At ``maxmemory``: writes answer OOM."""
        return self.maxmemory > 0 and self.used_memory >= self.maxmemory


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

    async def confirm_replicas(self) -> None:
        """Wait until the required replicas hold everything written so far.

        Raises:
            ReplicasShortfall: fewer replicas answered in time.
            StoreError: the round trip failed.
        """
        ...

    async def inspect(self) -> RedisState:
        """Durability and memory of the Redis we write to. Raises StoreError."""
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
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
        lanes: int = 8,
        sentinels: Sequence[str] = (),
        sentinel_master: str = "",
    ) -> None:
        self._ttl = str(dedup_ttl_s)
        self.dlq_maxlen = dlq_maxlen  # the bridge lowers it once it knows maxmemory
        self._min_replicas = min_replicas
        self._replica_timeout_ms = replica_timeout_ms
        self._cluster = cluster
        self._lanes = lanes
        self.scripts = ScriptSet({"append": APPEND_SCRIPT})
        # Load before the first batch and after any failure (Redis may have restarted
        # and forgotten it; a cluster pipeline does not always say NOSCRIPT plainly).
        self._load_scripts = True
        self._client = connect(
            url,
            timeout_s=timeout_s,
            cluster=cluster,
            sentinels=sentinels,
            sentinel_master=sentinel_master,
        )

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
        except _FAILURES as exc:
            raise store_error(exc, "redis ping") from exc
        return time.perf_counter() - start

    async def inspect(self) -> RedisState:
        try:
            persistence = await self._info("persistence")
            memory = await self._info("memory")
        except NoPermissionError:
            # The ACL hides INFO: reachable (or the error would differ), facts unknown.
            await self.ping()
            return RedisState(None, None, None, 0, 0)
        except _FAILURES as exc:
            raise store_error(exc, "redis INFO") from exc
        appendfsync: str | None
        try:
            reply: Any = await self._client.config_get("appendfsync")
        except NoPermissionError:
            appendfsync = None
        except _FAILURES as exc:
            if "NOPERM" in str(exc) or "unknown command" in str(exc):
                appendfsync = None
            else:
                raise store_error(exc, "redis CONFIG GET") from exc
        else:
            appendfsync = _config_value(reply, "appendfsync")
        aof = all(int(node.get("aof_enabled", 0)) == 1 for node in persistence)
        durable: bool | None
        if not aof:
            durable = False
        elif appendfsync is None:
            durable = None
        else:
            durable = appendfsync == "always"
        return RedisState(
            aof_enabled=aof,
            appendfsync=appendfsync,
            durable=durable,
            used_memory=max(int(node.get("used_memory", 0)) for node in memory),
            maxmemory=min(int(node.get("maxmemory", 0)) for node in memory),
        )

    async def _info(self, section: str) -> list[dict[str, Any]]:
        """INFO ``section`` of every node (one dict on a single Redis)."""
        if isinstance(self._client, RedisCluster):
            reply: Any = await self._client.info(section, target_nodes=RedisCluster.PRIMARIES)
        else:
            reply = await self._client.info(section)
        if reply and all(isinstance(value, dict) for value in reply.values()):
            return list(reply.values())
        return [reply]

    async def confirm_replicas(self) -> None:
        if self._min_replicas > 0:
            await self._fence_and_wait([], None)

    async def _fence_and_wait(self, results: list[AppendResult], keys: list[str] | None) -> None:
        """Return once ``min_replicas`` replicas hold what was written to ``keys`` (all: None).

        WAIT covers the writes of its own connection: a fresh write on the same
        connection (pipeline) puts everything written before it behind the WAIT.
        On a Cluster each primary replicates on its own: one fence write and WAIT
        per primary that took part of the batch, each pair on one connection to it
        (a cluster pipeline sends a node's commands on one connection, in order),
        and the fewest replicas any of them confirms is what counts.
        """
        pipe = self._client.pipeline(transaction=False)
        if isinstance(self._client, RedisCluster):
            for fence, node in _fences(self._client, keys).items():
                pipe.incr(fence)
                pipe.execute_command(
                    "WAIT", self._min_replicas, self._replica_timeout_ms, target_nodes=node
                )
        else:
            pipe.incr(FENCE_KEY)
            pipe.execute_command("WAIT", self._min_replicas, self._replica_timeout_ms)
        try:
            replies = await pipe.execute(raise_on_error=True)
        except _FAILURES as exc:
            raise store_error(exc, "redis WAIT") from exc
        self._check_replicas(min(int(reply) for reply in replies[1::2]), results)

    async def write(
        self, orders: Sequence[ValidOrder], dead: Sequence[DeadLetter], *, trim_shards: set[int]
    ) -> list[AppendResult]:
        by_shard: dict[int, list[int]] = defaultdict(list)
        for index, order in enumerate(orders):
            by_shard[order.shard].append(index)
        shard_order = list(by_shard)
        try:
            if self._load_scripts and by_shard:
                await self.scripts.load(self._client)
                self._load_scripts = False
            sent = await self._send(orders, dead, by_shard, trim_shards)
        except _FAILURES as exc:
            if not is_noscript(exc):
                self._load_scripts = True
                raise store_error(exc, "redis batch") from exc
            # Redis restarted and forgot the script: load it, send the batch again
            # (the script is idempotent; a dead letter may be written twice).
            try:
                await self.scripts.load(self._client)
                sent = await self._send(orders, dead, by_shard, trim_shards)
            except _FAILURES as again:
                self._load_scripts = True
                raise store_error(again, "redis batch") from again
        replies, acked = sent
        results: list[AppendResult] = [AppendResult.CONFLICT] * len(orders)
        for shard in shard_order:
            for index, code in zip(by_shard[shard], replies[shard], strict=True):
                results[index] = AppendResult(int(code))
        if self._min_replicas > 0 and acked is not None:
            self._check_replicas(acked, results)
        elif self._min_replicas > 0:
            # The lanes wrote on several connections: a fence write after all of
            # them, then WAIT on the fence's connection, covers the whole batch.
            # That holds on a Cluster (a node's commands share one connection);
            # for one master see _send.
            keys = [stream_key(shard) for shard in shard_order] + ([DLQ_STREAM] if dead else [])
            await self._fence_and_wait(results, keys)
        return results

    def _check_replicas(self, acked: int, results: list[AppendResult]) -> None:
        if acked < self._min_replicas:
            raise ReplicasShortfall(
                f"WAIT: {acked} of {self._min_replicas} replicas confirmed the batch", results
            )

    async def _send(
        self,
        orders: Sequence[ValidOrder],
        dead: Sequence[DeadLetter],
        by_shard: dict[int, list[int]],
        trim_shards: set[int],
    ) -> tuple[dict[int, Any], int | None]:
        """Send the batch over up to ``lanes`` connections at once.

        Returns the reply per shard, and on one master (not a Cluster) with
        ``min_replicas`` the fewest replicas any lane's WAIT confirmed (else None).

        Redis reads at most 16 kB per client per event-loop turn and, with
        ``appendfsync always``, fsyncs once per turn: one connection would make
        a large batch cost one fsync per 16 kB. Lanes let one turn read the
        whole batch, so it shares one fsync.

        On one master each lane ends with its own fence write and WAIT: WAIT
        vouches only for its own connection's node, and the lanes' pooled
        connections need not all reach the same node. Across a Sentinel
        failover a connection opened before it (to a master that froze, was
        replaced and resumed) stays in the pool while new ones reach the new
        master; a WAIT on another lane's connection then confirmed replicas of
        a node that had not run this lane's writes.
        """
        shard_order = list(by_shard)
        lanes = max(1, min(self._lanes, len(shard_order)))
        pipes = [self._client.pipeline(transaction=False) for _ in range(lanes)]
        lane_shards: list[list[int]] = [[] for _ in range(lanes)]
        for position, shard in enumerate(shard_order):
            lane = position % lanes
            lane_shards[lane].append(shard)
            group = [orders[index] for index in by_shard[shard]]
            keys = [stream_key(shard)] + [seen_key(shard, o.device_id, o.order_id) for o in group]
            meta = _encoder.encode(
                [
                    (o.digest, o.order_id, o.device_id, str(o.seq), str(o.received_at_ms),
                     len(o.payload))
                    if o.trace is None
                    else (o.digest, o.order_id, o.device_id, str(o.seq), str(o.received_at_ms),
                          len(o.payload), o.trace)
                    for o in group
                ]
            )  # fmt: skip
            payloads = b"".join(o.payload for o in group)
            trim = "1" if shard in trim_shards else "0"
            self.scripts.queue(pipes[lane], "append", keys, [self._ttl, trim, meta, payloads])
        for letter in dead:
            fields: dict[str, str | bytes | int] = {
                "reason": letter.reason,
                "topic": letter.topic[:MAX_TOPIC_CHARS],
                "payload": letter.payload[:MAX_ORDER_BYTES],
                "received_at": letter.received_at_ms,
            }
            if len(letter.payload) > MAX_ORDER_BYTES:
                fields["size"] = len(letter.payload)  # what came; the payload is cut
            pipes[-1].xadd(DLQ_STREAM, fields, maxlen=self.dlq_maxlen, approximate=True)  # type: ignore[arg-type]
        waits = self._min_replicas > 0 and not isinstance(self._client, RedisCluster)
        if waits:
            for pipe in pipes:
                pipe.incr(FENCE_KEY)
                pipe.execute_command("WAIT", self._min_replicas, self._replica_timeout_ms)
        replies: list[Any]
        if len(pipes) == 1:
            # One lane (a small batch: one shard): no gather, whose task per lane and
            # extra loop turn cost more than the batch's other Python work.
            replies = [await pipes[0].execute(raise_on_error=True)]
        else:
            replies = await asyncio.gather(
                *(pipe.execute(raise_on_error=True) for pipe in pipes), return_exceptions=True
            )
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        by_reply: dict[int, Any] = {}
        for shards, reply in zip(lane_shards, replies, strict=True):
            for shard, codes in zip(shards, reply, strict=False):
                by_reply[shard] = codes
        if not waits:
            return by_reply, None
        return by_reply, min(int(reply[-1]) for reply in replies)


def _fences(client: RedisCluster, keys: list[str] | None) -> dict[str, ClusterNode]:
    """A fence key on each primary holding one of ``keys`` (every primary: None), by key.

    The fence keys are ``orders:wait-fence:{N}``: in the bridge's ``orders:*`` keyspace,
    N the first number whose slot lands on the primary.
    """
    primaries = client.get_primaries()
    wanted = (
        {node.name for node in primaries}
        if keys is None
        else {_node_of(client, key).name for key in keys}
    )
    fences: dict[str, ClusterNode] = {}
    found: set[str] = set()
    for tag in range(_MAX_FENCE_TAGS):
        fence = f"{FENCE_KEY}:{{{tag}}}"
        node = _node_of(client, fence)
        if node.name in wanted and node.name not in found:
            fences[fence] = node
            found.add(node.name)
            if found == wanted:
                return fences
    raise RedisClusterException(f"no fence key found for primaries {sorted(wanted - found)}")


def _node_of(client: RedisCluster, key: str) -> ClusterNode:
    node = client.get_node_from_key(key)
    if node is None:
        raise RedisClusterException(f"no primary serves the slot of {key}")
    return node


def _config_value(reply: Any, name: str) -> str | None:
    """One value of a CONFIG GET reply (a dict; per node on a cluster)."""
    if isinstance(reply, dict):
        if name in reply or name.encode() in reply:
            value: Any = reply.get(name, reply.get(name.encode()))
            return text(value)
        values = {_config_value(node, name) for node in reply.values() if isinstance(node, dict)}
        if len(values) == 1:
            return values.pop()
        return "mixed" if values else None
    return None
