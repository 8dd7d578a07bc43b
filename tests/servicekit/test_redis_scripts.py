"""servicekit.redis_scripts against a real Redis: EVALSHA only, reload after SCRIPT FLUSH."""

from __future__ import annotations

import redis.asyncio as aioredis

from servicekit.redis_scripts import ScriptSet, script_sha

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


async def test_run_reloads_after_the_script_cache_is_lost(redis_url: str) -> None:
    """The first call loads; after SCRIPT FLUSH (a restart) the next call reloads and works."""
    client = aioredis.Redis.from_url(redis_url)
    scripts = ScriptSet({"incr": INCR_BY})
    try:
        assert scripts.sha["incr"] == script_sha(INCR_BY)
        assert await scripts.run(client, "incr", ["n"], [2]) == 2
        assert scripts.loads == 1  # NOSCRIPT on the very first call
        assert await scripts.run(client, "incr", ["n"], [3]) == 5
        assert scripts.loads == 1  # by SHA only
        await client.script_flush()
        assert await client.script_exists(scripts.sha["incr"]) == [False]
        assert await scripts.run(client, "incr", ["n"], [1]) == 6
        assert scripts.loads == 2
    finally:
        await client.aclose()


async def test_queue_sends_evalsha_in_a_pipeline(redis_url: str) -> None:
    """A queued call travels as EVALSHA: before LOAD it answers NOSCRIPT, after it runs."""
    client = aioredis.Redis.from_url(redis_url)
    scripts = ScriptSet({"incr": INCR_BY})
    try:
        await client.script_flush()
        pipe = client.pipeline(transaction=False)
        scripts.queue(pipe, "incr", ["m"], [1])
        (reply,) = await pipe.execute(raise_on_error=False)
        assert "NOSCRIPT" in str(reply) or "No matching script" in str(reply)
        await scripts.load(client)
        pipe = client.pipeline(transaction=False)
        scripts.queue(pipe, "incr", ["m"], [4])
        assert await pipe.execute() == [4]
    finally:
        await client.aclose()
