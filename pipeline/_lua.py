"""The pipeline's Lua scripts: every state change of an order is one of these, atomic in Redis.

Each works on a whole batch in one EVALSHA on a single Redis; on a cluster,
on one shard's orders per call (the calls go out in one pipeline: one round
trip). They run by
SHA1 through :class:`servicekit.redis_scripts.ScriptSet` (EVALSHA, SCRIPT LOAD
again on NOSCRIPT), the same helper the bridge uses; running a script again is
safe because every one is idempotent.

Redis Cluster: every key one call touches carries the hash tag ``{N}`` of one
shard (:mod:`pipeline.names`), and each call declares a key of that slot in
KEYS, so the call is routed to the node owning the slot and never crosses
slots. The per-order keys travel inside one JSON argument (all strings, so
that Lua never turns a number into "1.7e+12"): redis-py packs each argument in
Python, and thousands of small arguments cost far more than one big one.
"""

from __future__ import annotations

from typing import Final

from servicekit.redis_scripts import ScriptSet

# KEYS: a key of each shard's slot the call covers (routing). ARGV: JSON list of
# record keys.
# Read-only. Returns per order {} when it has no record yet (a record holding only
# a reservation counts as none: the order was never stored), else
# {status, reason, steps done (comma-separated)}.
LOAD: Final = """
local out = {}
for _, rec in ipairs(cjson.decode(ARGV[1])) do
  local f = redis.call('HMGET', rec, 'status', 'reason', 'steps')
  if f[1] then
    out[#out + 1] = {f[1], f[2] or '', f[3] or ''}
  else
    out[#out + 1] = {}
  end
end
return out
"""

# KEYS: events stream, stock and retention index of each shard the call covers.
# ARGV: now_ms, events maxlen, MessagePack list of one group per shard
#   [events stream, stock, retention index, rows], each row
#   [record, expected status ('' = no record yet), {field, value, ...} to HSET
#    (status, reason, steps, updated_at, last_error; for a new record also its
#    fixed fields and its history h:1..h:n and hn), history lines to append
#    ({} for a new record), final status ('' = unchanged), step, reason, path
#    (the batch's statuses, '>'-separated), order_id, device_id, device index,
#    index member, order-id index],
#   retention_ms.
# Everything one batch did to an order, stored at once: a compare-and-set on
# the status (statuses only move forward, so an equal status means nobody
# stored anything in between) guards against a consumer that raced us.
# Entering rejected/failed gives held stock back in the same atomic step. An
# order that ends with retention_ms > 0 gets its record expiring then. Per
# shard and call (not per order): one events entry listing every order stored
# with a new status, and one retention index entry (score: when) listing the
# orders that ended, so the worker can drop their index members once the
# records expired.
# Every value in the rows is a string (MessagePack, decoded by cmsgpack: about
# a third less Redis CPU than cjson for the same rows; a number would come back
# a Lua float, "1.7e+12").
# Returns per order, in the order given, 1 (stored) or -1 (the record moved
# under us: nothing stored).
COMMIT: Final = """
local now, maxlen, out = ARGV[1], ARGV[2], {}
local at = tonumber(now)
local keep = tonumber(ARGV[4] or '0')
for _, g in ipairs(cmsgpack.unpack(ARGV[3])) do
local events, stock, retention = g[1], g[2], g[3]
local changed, ended = {}, {}
for _, o in ipairs(g[4]) do
  local rec, expected, fields, lines, final = o[1], o[2], o[3], o[4], o[5]
  local status = redis.call('HGET', rec, 'status')
  if (expected == '' and status) or (expected ~= '' and status ~= expected) then
    out[#out + 1] = -1
  else
    if #lines > 0 then
      local n = tonumber(redis.call('HGET', rec, 'hn') or '0')
      for _, line in ipairs(lines) do
        n = n + 1
        fields[#fields + 1] = 'h:' .. n
        fields[#fields + 1] = line
      end
      fields[#fields + 1] = 'hn'
      fields[#fields + 1] = n
    end
    if #fields > 0 then redis.call('HSET', rec, unpack(fields)) end
    if expected == '' then
      redis.call('ZADD', o[11], 0, o[12])
      redis.call('SADD', o[13], o[10])
    end
    if final ~= '' then
      changed[#changed + 1] = {o[9], o[10], final, o[6], o[7], o[8]}
      if (final == 'rejected' or final == 'failed')
          and redis.call('HGET', rec, 'res') == 'held' then
        local all = redis.call('HGETALL', rec)
        for j = 1, #all, 2 do
          if string.sub(all[j], 1, 4) == 'res:' then
            redis.call('HINCRBY', stock, string.sub(all[j], 5), all[j + 1])
          end
        end
        redis.call('HSET', rec, 'res', 'released')
      end
      if keep > 0 and (final == 'rejected' or final == 'failed' or final == 'fulfilled') then
        redis.call('PEXPIRE', rec, keep)
        ended[#ended + 1] = {o[10], o[12]}
      end
    end
    out[#out + 1] = 1
  end
end
if #changed > 0 then
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'at', now,
    'orders', cjson.encode(changed))
end
if #ended > 0 then
  redis.call('ZADD', retention, at + keep, now .. ':' .. cjson.encode(ended))
end
end
return out
"""

# KEYS: the stock of each shard the call covers. ARGV: JSON list of
# [record, {sku, qty, sku, qty, ...}, the order's shard's stock].
# Idempotent per order: a held or released reservation is never made again, and
# a terminal order never reserves. All lines or none; the reservation lives in
# the order's record (`res`, `res:{sku}`).
# Returns per order 'reserved', 'held', 'released', 'terminal' or
# 'short:<sku>=<missing>[,<sku>=<missing>...]'.
RESERVE: Final = """
local out = {}
for _, o in ipairs(cjson.decode(ARGV[1])) do
  local rec, lines, stock = o[1], o[2], o[3]
  local f = redis.call('HMGET', rec, 'res', 'status')
  local state, status = f[1], f[2]
  if state then
    out[#out + 1] = state
  elseif status == 'rejected' or status == 'failed' or status == 'fulfilled' then
    out[#out + 1] = 'terminal'
  else
    local need, skus = {}, {}
    for j = 1, #lines, 2 do
      local sku = lines[j]
      if not need[sku] then need[sku] = 0; skus[#skus + 1] = sku end
      need[sku] = need[sku] + tonumber(lines[j + 1])
    end
    local held, short, left = {'res', 'held'}, {}, {}
    for j, sku in ipairs(skus) do
      left[j] = redis.call('HINCRBY', stock, sku, -need[sku])
      if left[j] < 0 then short[#short + 1] = sku .. '=' .. (-left[j]) end
      held[#held + 1] = 'res:' .. sku
      held[#held + 1] = need[sku]
    end
    if #short > 0 then
      for _, sku in ipairs(skus) do redis.call('HINCRBY', stock, sku, need[sku]) end
      out[#out + 1] = 'short:' .. table.concat(short, ',')
    else
      redis.call('HSET', rec, unpack(held))
      out[#out + 1] = 'reserved'
    end
  end
end
return out
"""

# KEYS: a shard's stock, its outgoing transfers. ARGV: transfer id, sku, units
# wanted, target shard, now_ms. Takes up to the units wanted (what is there) out
# of this shard's stock and logs the transfer, atomically; the target's GIVE and
# a ZREM of the log entry complete it. Returns the units taken.
TAKE: Final = """
local have = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
local n = math.min(have, tonumber(ARGV[3]))
if n <= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[2], -n)
redis.call('ZADD', KEYS[2], ARGV[5], cjson.encode({ARGV[1], ARGV[2], tostring(n), ARGV[4]}))
return n
"""

# KEYS: the target shard's stock, the transfer's received marker. ARGV: sku,
# units, marker ttl_s. Adds the units once per transfer. Returns 1, or 0 if done before.
GIVE: Final = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: pipeline:dlq, the entry's letter marker. ARGV: marker ttl_s, then
# field/value pairs. Appends once per source entry; returns the DLQ entry id
# (the first one's, when the entry was dead-lettered before).
LETTER: Final = """
local before = redis.call('GET', KEYS[2])
if before then return before end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], id, 'EX', ARGV[1])
return id
"""

# KEYS: dlq, replayed marker, target stream (one node only: a single Redis).
# ARGV: dlq entry id, marker ttl_s, then field/value pairs. Appends the order to
# its shard stream, remembers it, and removes the entry from the DLQ, all at once.
# Returns {1, new id} or {0, id it was replayed as before}.
REPLAY: Final = """
local done = redis.call('GET', KEYS[2])
if done then return {0, done} end
local id = redis.call('XADD', KEYS[3], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return {1, id}
"""

# KEYS: dlq, replayed marker. ARGV: dlq entry id, marker ttl_s, the new stream id.
# The cluster's second half of a replay (the XADD to the shard stream went first):
# remembers it and removes the DLQ entry, unless another replay was first.
# Returns {1, new id} or {0, id it was replayed as before}.
REPLAYED: Final = """
local done = redis.call('GET', KEYS[2])
if done then return {0, done} end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return {1, ARGV[3]}
"""

# KEYS: a shard's retention index. ARGV: now_ms, limit, the shard's hash tag
# ("{N}"). For up to `limit` retention entries that are due (each lists the
# [device_id, index member] of the orders one commit ended; their records
# expired by TTL meanwhile) removes each order's device index member and its
# device from the order-id set (key names as pipeline.names builds them).
# Returns how many orders.
FORGET: Final = """
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2])
local n, tag = 0, ARGV[3]
for _, member in ipairs(due) do
  local list = cjson.decode(string.sub(member, string.find(member, ':', 1, true) + 1))
  for _, o in ipairs(list) do
    local device, order_id = o[1], string.sub(o[2], 22)
    redis.call('ZREM', 'device:' .. tag .. ':' .. device .. ':orders', o[2])
    redis.call('SREM', 'order-id:' .. tag .. ':' .. order_id .. ':devices', device)
    n = n + 1
  end
  redis.call('ZREM', KEYS[1], member)
end
return n
"""

_SOURCES: Final = {
    "load": LOAD,
    "commit": COMMIT,
    "reserve": RESERVE,
    "take": TAKE,
    "give": GIVE,
    "letter": LETTER,
    "replay": REPLAY,
    "replayed": REPLAYED,
    "forget": FORGET,
}


class Scripts(ScriptSet):
    """The pipeline's scripts, run through :class:`servicekit.redis_scripts.ScriptSet`."""

    def __init__(self) -> None:
        super().__init__(_SOURCES)
