"""The Lua script that deduplicates and appends one batch of orders to one shard.

One call per shard per batch. Running it twice with the same orders is
harmless (the second run answers ``duplicate``), so it is the only write that
may be retried blindly.

KEYS: ``orders:{N}``, then one ``orders:{N}:seen:{device}:{order}`` per order.
ARGV: ttl_s, trim ("1" or "0"), a MessagePack array with one
``[digest, order_id, device_id, seq, received_at, payload_length, trace?]`` per
order (strings, but the length: Lua numbers are doubles; ``trace``, the order's
W3C traceparent, only when it has one, and then written as the entry's field
``trace``; it is not part of the digest), then all payloads
concatenated. Four arguments per call instead of six per order, because
redis-py's asyncio client packs every argument in Python and that packing was
the bridge's top cost. (Redis' cmsgpack predates the bin type, hence the
separate payload blob.)
Returns one integer per order: 1 appended, 0 duplicate, -1 conflict.

The marker is written after the XADD, not before: Redis does not roll back a
script that fails half way, and a marker without its entry would turn the
order into a false ``duplicate`` (lost), while an entry without its marker can
at worst be appended again on a retry.

The ``#!lua`` line (no flags) makes Redis refuse the whole call with OOM
before it starts when memory is at ``maxmemory``, so a batch is never half
written for lack of memory.

Trimming (``trim`` = "1"): ``XTRIM MINID ~ floor``, where floor is the smallest
of every consumer group's oldest pending id and last-delivered id. Entries at
or above the floor are never removed (approximate trimming removes only whole
nodes below it), so nothing a group has not read and acknowledged is lost. A
stream with no consumer group is never trimmed.
"""

from __future__ import annotations

from typing import Final

APPEND_SCRIPT: Final = r"""#!lua
local stream = KEYS[1]
local ttl = ARGV[1]
local orders = cmsgpack.unpack(ARGV[3])
local payloads = ARGV[4]
local at = 1
local out = {}
for i, o in ipairs(orders) do
  local payload = string.sub(payloads, at, at + o[6] - 1)
  at = at + o[6]
  local marker = KEYS[i + 1]
  local digest = o[1]
  local current = redis.call('GET', marker)
  if not current then
    if o[7] then
      redis.call('XADD', stream, '*', 'order_id', o[2], 'device_id', o[3], 'seq', o[4],
        'received_at', o[5], 'payload', payload, 'trace', o[7])
    else
      redis.call('XADD', stream, '*', 'order_id', o[2], 'device_id', o[3], 'seq', o[4],
        'received_at', o[5], 'payload', payload)
    end
    redis.call('SET', marker, digest, 'EX', ttl)
    out[#out + 1] = 1
  elseif current == digest then
    out[#out + 1] = 0
  else
    out[#out + 1] = -1
  end
end

local function older(x, y)
  local xm, xs = string.match(x, '^(%d+)-(%d+)$')
  local ym, ys = string.match(y, '^(%d+)-(%d+)$')
  xm, xs, ym, ys = tonumber(xm), tonumber(xs), tonumber(ym), tonumber(ys)
  return xm < ym or (xm == ym and xs < ys)
end

if ARGV[2] == '1' and redis.call('EXISTS', stream) == 1 then
  local groups = redis.call('XINFO', 'GROUPS', stream)
  local floor = nil
  for _, g in ipairs(groups) do
    local info = {}
    for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
    local candidate = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then
      local pending = redis.call('XPENDING', stream, info['name'])
      if pending[2] and older(pending[2], candidate) then candidate = pending[2] end
    end
    if floor == nil or older(candidate, floor) then floor = candidate end
  end
  if floor ~= nil and floor ~= '0-0' then
    redis.call('XTRIM', stream, 'MINID', '~', floor)
  end
end
return out
"""
