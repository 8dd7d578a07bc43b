"""The bridge replica's heartbeat in Redis, for the orders API's ops page.

Every ``interval_s`` (default 5 s) a replica writes, one key per command so
that it works on a Redis Cluster as on a single node::

    HSET   ops:bridge:{client_id}  ready 1|0  redis_durable 1|0  at <ms>  interval_ms <ms>
                                   in_flight <n>  failing <check,…>  version <release>
    EXPIRE ops:bridge:{client_id}  30
    ZADD   ops:bridges  <ms> <client_id>
    ZREMRANGEBYSCORE ops:bridges -inf <ms - 1 day>     (replicas gone for a day)

``version`` is the replica's release (:mod:`servicekit.version`), so the page
shows which replicas an upgrade has reached. A replica that stops beating lets
its hash expire; the page then shows it stale or gone. A failed beat is logged
and retried on the next tick: the heartbeat never stops the bridge, whose own
work does not depend on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Protocol, Self

import structlog
from redis.exceptions import RedisClusterException, RedisError

from schemas.names import BRIDGES_KEY, bridge_key
from servicekit.clock import now_ms
from servicekit.redis_clients import connect
from servicekit.version import package_version

log = structlog.get_logger(__name__)

MIN_TTL_S: Final = 30
FORGET_AFTER_MS: Final = 24 * 3600 * 1000
_FAILURES: Final = (RedisError, RedisClusterException, OSError)

Report = Callable[[], dict[str, str | int]]


def ttl_for(interval_s: float) -> int:
    """The hash's TTL: 30 s, or six beats when beats are further apart."""
    return max(MIN_TTL_S, math.ceil(interval_s * 6))


class HeartbeatStore(Protocol):
    """Where beats go; :class:`RedisHeartbeat` is the real one."""

    async def beat(self, client_id: str, fields: dict[str, str | int], ttl_s: int) -> None:
        """Record one beat. Raises a Redis error or OSError when it could not."""
        ...


class RedisHeartbeat:
    """:class:`HeartbeatStore` on a single Redis or a Redis Cluster (async context manager)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        timeout_s: float = 5.0,
        sentinels: Sequence[str] = (),
        sentinel_master: str = "",
    ) -> None:
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

    async def beat(self, client_id: str, fields: dict[str, str | int], ttl_s: int) -> None:
        at = int(fields.get("at", now_ms()))
        key = bridge_key(client_id)
        # Separate commands, not MULTI: the hash and the zset live in different slots.
        await self._client.hset(key, mapping=fields)  # type: ignore[arg-type]
        await self._client.expire(key, ttl_s)
        await self._client.zadd(BRIDGES_KEY, {client_id: at})
        await self._client.zremrangebyscore(BRIDGES_KEY, "-inf", at - FORGET_AFTER_MS)


async def run_heartbeat(
    store: HeartbeatStore,
    client_id: str,
    report: Report,
    interval_s: float,
    closed: Callable[[], bool] = lambda: False,
) -> None:
    """Beat every ``interval_s`` until cancelled or ``closed()``; a failed beat is logged,
    never raised. (The flag as well: Python 3.11 can lose a cancel that lands as a
    redis-py timeout fires, and the bridge's shutdown must not hang on it.)"""
    ttl_s = ttl_for(interval_s)
    version = package_version()
    failing = False
    while not closed():
        fields = {
            **report(), "at": now_ms(), "interval_ms": int(interval_s * 1000), "version": version,
        }  # fmt: skip
        try:
            await store.beat(client_id, fields, ttl_s)
        except _FAILURES as exc:
            if not failing:
                log.warning("heartbeat_failed", client_id=client_id, error=repr(exc))
            failing = True
        else:
            if failing:
                log.info("heartbeat_restored", client_id=client_id)
            failing = False
        await asyncio.sleep(interval_s)
