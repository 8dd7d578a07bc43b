"""The pipeline's Lua scripts: every state change of an order is one of these, atomic in Redis.

Each takes a whole batch in one EVALSHA (one round trip, one reply), which is
what makes the per-order cost small. They run by SHA1 through
:class:`servicekit.redis_scripts.ScriptSet` (EVALSHA, SCRIPT LOAD again on
NOSCRIPT), the same helper the bridge uses; running a script again is safe
because every one is idempotent.

Pipeline keys are not hash-tagged per slot (the stock hash is shared by all
orders), so these scripts need a single Redis node, not a cluster.
"""

from __future__ import annotations

from typing import Final

from servicekit.redis_scripts import ScriptSet

# Every script below works on a whole batch in one call: orders are handled in
# the order given (the worker sorts by device and seq), each order atomically.
# The per-order part travels as ONE JSON argument (all strings, so that Lua
# never turns a number into "1.7e+12"): redis-py packs each argument in Python,
# and thousands of small arguments cost far more than one big one. The per-order
# keys are therefore not declared in KEYS; they come from pipeline.names.

# ARGV: JSON list of record keys. Read-only.
# Returns per order {} when it has no record yet, else {status, reason, {done steps}}.
LOAD: Final = """
local out = {}
for _, rec in ipairs(cjson.decode(ARGV[1])) do
  local fields = redis.call('HGETALL', rec)
  if #fields == 0 then
    out[#out + 1] = {}
  else
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

# KEYS: events, stock, retention index. ARGV: now_ms, events maxlen, JSON list of
#   [record, history, reservation, expected status ('' = no record yet),
#    {field, value, ...} to HSET (status, reason, done markers, last_error; for a
#    new record also its fixed fields), {[status, step, reason], ...} transitions,
#    order_id, device_id, device index, index member, order-id index].
# Everything one batch did to an order, stored at once: a compare-and-set on
# the status (statuses only move forward, so an equal status means nobody
# stored anything in between) guards against a consumer that raced us.
# Entering rejected/failed gives a held reservation back in the same atomic
# step. An order that ends (fulfilled, rejected, failed) with retention_ms > 0
# (ARGV[4]) gets its record, history and reservation expiring then, and an
# entry in the retention index (score: when) so its index members go too.
# Returns per order 1 (stored) or -1 (the record moved under us: nothing stored).
COMMIT: Final = """
local events, stock, now, maxlen, out = KEYS[1], KEYS[2], ARGV[1], ARGV[2], {}
local at = tonumber(now)
local keep = tonumber(ARGV[4] or '0')
for _, o in ipairs(cjson.decode(ARGV[3])) do
  local rec, hist, res, expected, fields, changes = o[1], o[2], o[3], o[4], o[5], o[6]
  local status = redis.call('HGET', rec, 'status')
  if (expected == '' and status) or (expected ~= '' and status ~= expected) then
    out[#out + 1] = -1
  else
    if #fields > 0 then redis.call('HSET', rec, unpack(fields)) end
    if expected == '' then
      redis.call('ZADD', o[9], 0, o[10])
      redis.call('SADD', o[11], o[8])
    end
    if #changes > 0 then
      local lines, final = {}, ''
      for j, c in ipairs(changes) do
        lines[j] = cjson.encode({status=c[1], step=c[2], reason=c[3], at=at})
        redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'order_id', o[7],
          'device_id', o[8], 'status', c[1], 'step', c[2], 'reason', c[3], 'at', now)
        final = c[1]
      end
      redis.call('RPUSH', hist, unpack(lines))
      if (final == 'rejected' or final == 'failed')
          and redis.call('HGET', res, '_state') == 'held' then
        local held = redis.call('HGETALL', res)
        for j = 1, #held, 2 do
          if string.sub(held[j], 1, 2) == 's:' then
            redis.call('HINCRBY', stock, string.sub(held[j], 3), held[j + 1])
          end
        end
        redis.call('HSET', res, '_state', 'released')
      end
      if keep > 0 and (final == 'rejected' or final == 'failed' or final == 'fulfilled') then
        for _, key in ipairs({rec, hist, res}) do redis.call('PEXPIRE', key, keep) end
        redis.call('ZADD', KEYS[3], at + keep, cjson.encode({o[9], o[10], o[11], o[8]}))
      end
    end
    out[#out + 1] = 1
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

# KEYS: dlq, replayed marker, target stream. ARGV: dlq entry id, marker ttl_s, then
# field/value pairs. Appends the order to its shard stream, remembers it, and
# removes the entry from the DLQ, all at once.
# Returns {1, new id} or {0, id it was replayed as before}.
REPLAY: Final = """
local done = redis.call('GET', KEYS[2])
if done then return {0, done} end
local id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return {1, id}
"""

# KEYS: retention index. ARGV: now_ms, limit. Removes the index members of up to
# `limit` orders whose retention ended (their keys expired by TTL meanwhile):
# the device index member and the device in the order-id set. Returns how many.
FORGET: Final = """
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local o = cjson.decode(member)
  redis.call('ZREM', o[1], o[2])
  redis.call('SREM', o[3], o[4])
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

_SOURCES: Final = {
    "load": LOAD,
    "commit": COMMIT,
    "reserve": RESERVE,
    "replay": REPLAY,
    "forget": FORGET,
}


class Scripts(ScriptSet):
    """The pipeline's scripts, run through :class:`servicekit.redis_scripts.ScriptSet`."""

    def __init__(self) -> None:
        super().__init__(_SOURCES)
