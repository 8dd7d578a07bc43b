"""The pipeline's Lua scripts: every state change of an order is one of these, atomic in Redis.

Each takes a whole batch in one EVALSHA (one round trip, one reply), which is
what makes the per-order cost small. They are loaded with SCRIPT LOAD and
loaded again when Redis lost its script cache (a restart); running a script
again is safe because every one is idempotent.

Pipeline keys are not hash-tagged per slot (the stock hash is shared by all
orders), so these scripts need a single Redis node, not a cluster.
"""

from __future__ import annotations

from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

# Every script below works on a whole batch in one call: orders are handled in
# the order given (the worker sorts by device and seq), each order atomically.
# The per-order part travels as ONE JSON argument (all strings, so that Lua
# never turns a number into "1.7e+12"): redis-py packs each argument in Python,
# and thousands of small arguments cost far more than one big one. The per-order
# keys are therefore not declared in KEYS; they come from pipeline.names.

# KEYS: events. ARGV: now_ms, events maxlen, JSON list of
#   [record, history, device index, order_id, device_id, seq, received_at,
#    total, currency, index member, items json, stream, entry id, order-id index].
# Returns per order {status, reason, {done steps}}.
ADMIT: Final = """
local now, maxlen, out = ARGV[1], ARGV[2], {}
for _, o in ipairs(cjson.decode(ARGV[3])) do
  local rec = o[1]
  do
    if redis.call('EXISTS', rec) == 0 then
      redis.call('HSET', rec, 'order_id', o[4], 'device_id', o[5], 'seq', o[6],
        'received_at', o[7], 'total', o[8], 'currency', o[9], 'items', o[11],
        'stream', o[12], 'entry_id', o[13], 'status', 'received', 'reason', '',
        'created', now, 'updated_at', now)
      redis.call('ZADD', o[3], 0, o[10])
      redis.call('SADD', o[14], o[5])
      redis.call('RPUSH', o[2], cjson.encode({status='received', step='', reason='',
        at=tonumber(now)}))
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'order_id', o[4],
        'device_id', o[5], 'status', 'received', 'step', '', 'reason', '', 'at', now)
    end
    local fields = redis.call('HGETALL', rec)
    local status, reason, done = '', '', {}
    for j = 1, #fields, 2 do
      local name = fields[j]
      if name == 'status' then status = fields[j + 1]
      elseif name == 'reason' then reason = fields[j + 1]
      elseif string.sub(name, 1, 5) == 'done:' then done[#done + 1] = string.sub(name, 6) end
    end
    out[#out + 1] = {status, reason, done}
  end
end
return out
"""

# KEYS: events, stock. ARGV: step, now_ms, events maxlen, JSON list of
#   [record, history, reservation, expected status, new status ('' = none), reason].
# Compare-and-set on the status plus a done marker per step: applied at most
# once. Entering rejected/failed gives a held reservation back in the same
# atomic step. Returns per order {1, status} applied, {0, status} step already
# done, {-1, status} the status moved under us.
TRANSITION: Final = """
local step, now, maxlen, out = ARGV[1], ARGV[2], ARGV[3], {}
local marker = 'done:' .. step
for _, o in ipairs(cjson.decode(ARGV[4])) do
  local rec, hist, res, expected, new, reason = o[1], o[2], o[3], o[4], o[5], o[6]
  local status = redis.call('HGET', rec, 'status') or ''
  if redis.call('HEXISTS', rec, marker) == 1 then
    out[#out + 1] = {0, status}
  elseif status ~= expected then
    out[#out + 1] = {-1, status}
  elseif new == '' then
    redis.call('HSET', rec, marker, now)
    out[#out + 1] = {1, status}
  else
    redis.call('HSET', rec, marker, now, 'status', new, 'reason', reason, 'updated_at', now)
    if (new == 'rejected' or new == 'failed') and redis.call('HGET', res, '_state') == 'held' then
      local held = redis.call('HGETALL', res)
      for j = 1, #held, 2 do
        if string.sub(held[j], 1, 2) == 's:' then
          redis.call('HINCRBY', KEYS[2], string.sub(held[j], 3), held[j + 1])
        end
      end
      redis.call('HSET', res, '_state', 'released')
    end
    local ids = redis.call('HMGET', rec, 'order_id', 'device_id')
    redis.call('RPUSH', hist, cjson.encode({status=new, step=step, reason=reason,
      at=tonumber(now)}))
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'order_id', ids[1],
      'device_id', ids[2], 'status', new, 'step', step, 'reason', reason, 'at', now)
    out[#out + 1] = {1, new}
  end
end
return out
"""

# KEYS: stock. ARGV: JSON list of [reservation, record, {sku, qty, sku, qty, ...}].
# Idempotent per order: a held or released reservation is never made again, and
# a terminal order never reserves. All lines or none.
# Returns per order 'reserved', 'held', 'released', 'terminal' or 'short:<sku>'.
RESERVE: Final = """
local out = {}
for _, o in ipairs(cjson.decode(ARGV[1])) do
  local res, rec, lines = o[1], o[2], o[3]
  local state = redis.call('HGET', res, '_state')
  local status = redis.call('HGET', rec, 'status')
  if state then
    out[#out + 1] = state
  elseif status == 'rejected' or status == 'failed' or status == 'fulfilled' then
    out[#out + 1] = 'terminal'
  else
    local need, skus, short = {}, {}, nil
    for j = 1, #lines, 2 do
      local sku = lines[j]
      if not need[sku] then need[sku] = 0; skus[#skus + 1] = sku end
      need[sku] = need[sku] + tonumber(lines[j + 1])
    end
    for _, sku in ipairs(skus) do
      if not short and tonumber(redis.call('HGET', KEYS[1], sku) or '0') < need[sku] then
        short = sku
      end
    end
    if short then
      out[#out + 1] = 'short:' .. short
    else
      for _, sku in ipairs(skus) do
        redis.call('HINCRBY', KEYS[1], sku, -need[sku])
        redis.call('HSET', res, 's:' .. sku, need[sku])
      end
      redis.call('HSET', res, '_state', 'held')
      out[#out + 1] = 'reserved'
    end
  end
end
return out
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
