"""The one way our services run Lua in Redis: EVALSHA, and SCRIPT LOAD again on NOSCRIPT.

A script travels once per Redis process (SCRIPT LOAD), then only its SHA1 does.
Redis forgets its script cache on a restart or a failover; the first EVALSHA
after that answers NOSCRIPT, and the caller loads the scripts again and repeats
the call. That repeat is only safe because every script we run is idempotent:
a script that already ran answers the same way the second time.

Both redis-py clients work: a single :class:`redis.asyncio.Redis` and a
:class:`redis.asyncio.cluster.RedisCluster` (SCRIPT LOAD goes to every primary).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import NoScriptError

AnyClient = aioredis.Redis | RedisCluster
AnyPipeline = aioredis.client.Pipeline | ClusterPipeline


def script_sha(source: str) -> str:
    """The SHA1 Redis files a script under (what SCRIPT LOAD answers)."""
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def is_noscript(exc: BaseException) -> bool:
    """True when Redis answered NOSCRIPT (its script cache lost the script)."""
    return isinstance(exc, NoScriptError) or "NOSCRIPT" in str(exc)


class ScriptSet:
    """Named Lua scripts, run by SHA1.

    ``ScriptSet({"append": SOURCE})``; then ``await scripts.run(client, "append",
    keys, args)``, or ``scripts.queue(pipe, ...)`` inside a pipeline followed by
    :meth:`load` and a retry of the pipeline when it failed with NOSCRIPT.
    """

    def __init__(self, sources: Mapping[str, str]) -> None:
        self._sources = dict(sources)
        self.sha = {name: script_sha(source) for name, source in self._sources.items()}
        self.loads = 0  # SCRIPT LOAD rounds, for tests and logs

    async def load(self, client: AnyClient) -> None:
        """SCRIPT LOAD every script (cheap and idempotent)."""
        for name, source in self._sources.items():
            sha = await client.script_load(source)
            if isinstance(sha, bytes):
                sha = sha.decode()
            if isinstance(sha, str) and sha != self.sha[name]:
                raise RuntimeError(f"SCRIPT LOAD of {name} answered {sha}, not {self.sha[name]}")
        self.loads += 1

    async def run(
        self, client: AnyClient, name: str, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """EVALSHA one script; on NOSCRIPT load the scripts and call it once more."""
        try:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)

    def queue(self, pipe: AnyPipeline, name: str, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add an EVALSHA of ``name`` to a pipeline (the caller handles NOSCRIPT).

        Sent as a raw command: redis-py's cluster pipeline refuses its ``evalsha``
        method, yet routes a raw EVALSHA by its keys.
        """
        pipe.execute_command("EVALSHA", self.sha[name], len(keys), *keys, *args)
