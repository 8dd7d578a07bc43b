"""The pipeline's Lua scripts: every state change of an order is one of these, atomic in Redis.

They are loaded once per connection pool with SCRIPT LOAD and run with EVALSHA
inside pipelines; :func:`run_pipeline` reloads them when Redis lost its script
cache (a restart) and runs the pipeline again, which is safe because every
script is idempotent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

# KEYS: order, history, device index, events.
# ARGV: order_id, device_id, seq, received_at, total, currency, stream, entry_id,
#       now_ms, index member, events maxlen, items json.
# Returns {1, HGETALL} or {0, other device_id} when the order_id belongs to another device.
ADMIT: Final = """
local dev = redis.call('HGET', KEYS[1], 'device_id')
if dev then
  if dev ~= ARGV[2] then return {0, dev} end
  return {1, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'order_id', ARGV[1], 'device_id', ARGV[2], 'seq', ARGV[3],
  'received_at', ARGV[4], 'total', ARGV[5], 'currency', ARGV[6], 'stream', ARGV[7],
  'entry_id', ARGV[8], 'status', 'received', 'reason', '', 'created', ARGV[9],
  'updated_at', ARGV[9], 'items', ARGV[12])
redis.call('ZADD', KEYS[3], 0, ARGV[10])
redis.call('RPUSH', KEYS[2], cjson.encode({status='received', step='', reason='',
  at=tonumber(ARGV[9])}))
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'order_id', ARGV[1],
  'device_id', ARGV[2], 'status', 'received', 'step', '', 'reason', '', 'at', ARGV[9])
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: order, history, events, stock, reservation.
# ARGV: step, expected status, new status ('' = none), reason, now_ms, events maxlen.
# Compare-and-set on the status plus a done marker per step: applied at most once.
# Entering rejected/failed gives a held reservation back in the same atomic step.
# Returns {1, status} applied, {0, status} step already done, {-1, status} status moved.
TRANSITION: Final = """
local status = redis.call('HGET', KEYS[1], 'status') or ''
if redis.call('HEXISTS', KEYS[1], 'done:' .. ARGV[1]) == 1 then return {0, status} end
if status ~= ARGV[2] then return {-1, status} end
redis.call('HSET', KEYS[1], 'done:' .. ARGV[1], ARGV[5])
local new = ARGV[3]
if new == '' then return {1, status} end
redis.call('HSET', KEYS[1], 'status', new, 'reason', ARGV[4], 'updated_at', ARGV[5])
if (new == 'rejected' or new == 'failed')
    and redis.call('HGET', KEYS[5], '_state') == 'held' then
  local held = redis.call('HGETALL', KEYS[5])
  for i = 1, #held, 2 do
    if string.sub(held[i], 1, 2) == 's:' then
      redis.call('HINCRBY', KEYS[4], string.sub(held[i], 3), held[i + 1])
    end
  end
  redis.call('HSET', KEYS[5], '_state', 'released')
end
local order_id = redis.call('HGET', KEYS[1], 'order_id')
local device_id = redis.call('HGET', KEYS[1], 'device_id')
redis.call('RPUSH', KEYS[2], cjson.encode({status=new, step=ARGV[1], reason=ARGV[4],
  at=tonumber(ARGV[5])}))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'order_id', order_id,
  'device_id', device_id, 'status', new, 'step', ARGV[1], 'reason', ARGV[4], 'at', ARGV[5])
return {1, new}
"""

# KEYS: stock, reservation, order. ARGV: sku, qty, sku, qty, ...
# Idempotent per order: a held or released reservation is never made again, and
# a terminal order never reserves. All items or none.
# Returns 'reserved', 'held', 'released', 'terminal' or 'short:<sku>'.
RESERVE: Final = """
local state = redis.call('HGET', KEYS[2], '_state')
if state then return state end
local status = redis.call('HGET', KEYS[3], 'status')
if status == 'rejected' or status == 'failed' or status == 'fulfilled' then
  return 'terminal'
end
local need, skus = {}, {}
for i = 1, #ARGV, 2 do
  local sku = ARGV[i]
  if not need[sku] then need[sku] = 0; skus[#skus + 1] = sku end
  need[sku] = need[sku] + tonumber(ARGV[i + 1])
end
for _, sku in ipairs(skus) do
  if tonumber(redis.call('HGET', KEYS[1], sku) or '0') < need[sku] then
    return 'short:' .. sku
  end
end
for _, sku in ipairs(skus) do
  redis.call('HINCRBY', KEYS[1], sku, -need[sku])
  redis.call('HSET', KEYS[2], 's:' .. sku, need[sku])
end
redis.call('HSET', KEYS[2], '_state', 'held')
return 'reserved'
"""

# KEYS: dlq, replayed marker, target stream. ARGV: dlq entry id, then field/value pairs.
# Returns {1, new id} or {0, id it was replayed as before}.
REPLAY: Final = """
local done = redis.call('GET', KEYS[2])
if done then return {0, done} end
local id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id)
return {1, id}
"""

_SOURCES: Final = {"admit": ADMIT, "transition": TRANSITION, "reserve": RESERVE, "replay": REPLAY}


class Scripts:
    """SHA1s of the loaded scripts, by name."""

    def __init__(self) -> None:
        self.sha: dict[str, str] = {}

    async def load(self, client: aioredis.Redis) -> None:
        """SCRIPT LOAD every script (cheap, idempotent)."""
        for name, source in _SOURCES.items():
            self.sha[name] = await client.script_load(source)

    async def evalsha(
        self, client: aioredis.Redis, name: str, keys: list[str], args: list[Any]
    ) -> Any:
        """EVALSHA one script, loading the cache again if Redis forgot it."""
        if name not in self.sha:
            await self.load(client)
        try:
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self.sha[name], len(keys), *keys, *args)


async def run_pipeline(
    client: aioredis.Redis,
    scripts: Scripts,
    fill: Callable[[Any], None],
) -> list[Any]:
    """Build a non-transactional pipeline with ``fill(pipe)`` and execute it.

    ``fill`` gets the pipeline and queues commands (EVALSHAs via
    :func:`queue_script`). On NOSCRIPT the scripts are loaded and the whole
    pipeline runs again.
    """
    if not scripts.sha:
        await scripts.load(client)
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        fill(pipe)
        try:
            return await pipe.execute()
        except NoScriptError:
            if attempt:
                raise
            await scripts.load(client)
        except ResponseError as exc:
            if "NOSCRIPT" not in str(exc) or attempt:
                raise
            await scripts.load(client)
    raise AssertionError("unreachable")


def queue_script(pipe: Any, scripts: Scripts, name: str, keys: list[str], args: list[Any]) -> None:
    """Queue one EVALSHA on a pipeline."""
    pipe.evalsha(scripts.sha[name], len(keys), *keys, *args)


Runner = Callable[[Callable[[Any], None]], Awaitable[list[Any]]]
