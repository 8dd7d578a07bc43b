"""How every service opens Redis (:func:`connect`), and :func:`text` for its replies.

One of three shapes, the same for every service:

- a single Redis at ``url``;
- a Redis Cluster reached through any node's ``url`` (``cluster``);
- the master of a Sentinel-monitored group (``sentinels`` and ``sentinel_master``):
  the client asks the Sentinels for the master's address on every new connection,
  so after a promotion the next connection goes to the new master, with no restart.
  A connection to a master that was demoted meanwhile answers READONLY, which
  redis-py turns into a ConnectionError and a fresh look-up. ``url`` then gives only
  the user, password, database and TLS; its host and port are ignored.

redis-py retries a failed command itself by default (three times, with
backoff up to seconds). Our loops retry whole units of work with
:class:`servicekit.backoff.Backoff` instead, so a client's own retries are
switched off: a failure comes back at once, is counted, and the loop's
backoff (capped, reset on success) decides when to try again.

Importing this module also fixes redis-py's command send on CPython 3.11, which
could lose a cancel (:mod:`servicekit.redis_send`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from . import redis_send

redis_send.install()

AnyRedis = aioredis.Redis | RedisCluster

_ADDRESS: Final = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


def text(value: bytes | str) -> str:
    """A Redis reply as text: replies come as bytes; keys and codes are UTF-8 text."""
    return value.decode() if isinstance(value, bytes) else value


def client_options(timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url``/``RedisCluster.from_url``: no retries, timeouts."""
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }


def sentinel_address(entry: str) -> tuple[str, int]:
    """``(host, port)`` of one ``--redis-sentinel HOST:PORT`` entry.

    Raises:
        ValueError: not HOST:PORT with a port 1-65535.
    """
    match = _ADDRESS.fullmatch(entry.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"redis_sentinel {entry!r} is not HOST:PORT")
    return match["host"].strip("[]"), int(match["port"])


def check_sentinel_settings(sentinels: Sequence[str], master: str, *, cluster: bool) -> None:
    """Refuse a Sentinel setting that cannot work.

    Raises:
        ValueError: a bad address, one of the two settings without the other, or
            Sentinel together with a Redis Cluster.
    """
    for entry in sentinels:
        sentinel_address(entry)
    if bool(sentinels) != bool(master):
        raise ValueError("redis_sentinel and redis_sentinel_master go together: give both")
    if sentinels and cluster:
        raise ValueError("redis_sentinel is for a single-shard Redis, not with redis_cluster")


def connect(
    url: str,
    *,
    timeout_s: float,
    cluster: bool = False,
    sentinels: Sequence[str] = (),
    sentinel_master: str = "",
    **options: Any,
) -> AnyRedis:
    """A client without retries of its own for a single Redis, a Cluster or a Sentinel master.

    Args:
        url: redis://[user[:password]@]host:port/db (rediss:// for TLS); with
            ``sentinels`` only its user, password, database and TLS count.
        timeout_s: connect and reply timeout of every connection (and of each Sentinel).
        cluster: talk to ``url`` as a Redis Cluster.
        sentinels: HOST:PORT of each Sentinel (see :func:`sentinel_address`).
        sentinel_master: the master group's name the Sentinels monitor.
        options: more keyword arguments for the client (they override the defaults).
    """
    kwargs = client_options(timeout_s) | options
    if sentinels:
        return _sentinel_master(url, sentinels, sentinel_master, kwargs)
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)


def redis_credentials(url: str) -> dict[str, Any]:
    """What a Sentinel-found master's connections take from ``url``: user, password, db, TLS."""
    parsed = parse_url(url)
    found = {
        key: parsed[key] for key in ("username", "password", "db") if parsed.get(key) is not None
    }
    if url.startswith("rediss://"):
        found["ssl"] = True
    return found


class SentinelMaster(aioredis.Redis):
    """The master's client from :func:`connect`; closing it closes its Sentinels' connections."""

    owned_sentinel: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.owned_sentinel is not None:
            await self.owned_sentinel.aclose()


def _sentinel_master(
    url: str, sentinels: Sequence[str], master: str, kwargs: dict[str, Any]
) -> aioredis.Redis:
    kwargs |= redis_credentials(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [sentinel_address(entry) for entry in sentinels],
        # The Sentinels themselves: same timeouts, no password (Sentinel ACLs are
        # separate; put them behind the same network rules as Redis).
        sentinel_kwargs={
            "socket_timeout": kwargs["socket_timeout"],
            "socket_connect_timeout": kwargs["socket_connect_timeout"],
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client: SentinelMaster = sentinel.master_for(master, redis_class=SentinelMaster, **kwargs)
    client.owned_sentinel = sentinel
    return client


# Redis's error code (NOREPLICAS, READONLY, …): the message's first word, or the first
# word of the server's message inside redis-py's "Command # N (…) of pipeline caused
# error: ('…',)" (the last such phrase: the command text before it may hold anything).
_ERROR_CODE: Final = re.compile(r"(?:.*of pipeline caused error: \(['\"])?([A-Z]{3,})\b.*", re.S)


def error_code(exc: BaseException) -> str | None:
    """The error code Redis answered with; None for an error of another kind."""
    if not isinstance(exc, RedisError):
        return None
    match = _ERROR_CODE.fullmatch(str(exc))
    return match[1] if match else None
