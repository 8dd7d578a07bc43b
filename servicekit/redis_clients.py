"""Connection settings every service's Redis client shares, and :func:`text` for its replies.

redis-py retries a failed command itself by default (three times, with
backoff up to seconds). Our loops retry whole units of work with
:class:`servicekit.backoff.Backoff` instead, so a client's own retries are
switched off: a failure comes back at once, is counted, and the loop's
backoff (capped, reset on success) decides when to try again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


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
