//! The Lua scripts that make each Redis operation atomic: offsets and history in Streams,
//! presence in sorted sets. Every script starts with [`PRELUDE`].

use redis::Script;

/// Shared by every script: the server's clock, and a channel's epoch (created by its first
/// publication; reads never create it, see [`HISTORY`]).
pub const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function epoch_of(meta, stream, fresh)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    epoch = fresh
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'e', epoch, 'o', 0, 'b', 0)
  end
  return epoch
end
";

/// A script with [`PRELUDE`] in front of `body`.
pub fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// Assigns the next offset, appends and trims history, publishes. See the module docs.
///
/// With an idempotency key (`KEYS[3]`, its window in ms in `ARGV[9]`, `''` without one), the
/// key holds `epoch|offset` of its first publish: if it is there *and of the current epoch*,
/// nothing is done and that offset is returned as a duplicate (a key that outlived its
/// channel's stream must not name an offset of the new one). Returns epoch, offset and `1`
/// for a duplicate or `0`. `ARGV[10]`: for the first publication of a pipeline, how many were
/// pipelined together (`''` otherwise): the publication is then announced right before it
/// (`r|<n>|<offset>`, see [`crate::broker::wire`]), atomically and only if it is published.
pub const PUBLISH: &str = r"
local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]
local epoch = epoch_of(meta, stream, ARGV[8])
if ARGV[9] ~= '' then
  local seen = redis.call('GET', idem)
  if seen then
    local e, o = string.match(seen, '^([^|]*)|(%d+)$')
    if e == epoch then
      return {epoch, o, '1'}
    end
  end
end
local offset = redis.call('HINCRBY', meta, 'o', 1)
local now = now_ms()
local data, client = ARGV[2], ARGV[3]
local size, ttl, maxb = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local bytes = tonumber(redis.call('HGET', meta, 'b') or '0')
if size > 0 and #data <= maxb then
  redis.call('XADD', stream, offset .. '-0', 'd', data, 'c', client, 't', now)
  bytes = bytes + #data
end
local count = redis.call('XLEN', stream)
while count > 0 do
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  local len, at = #oldest[2][2], tonumber(oldest[2][6])
  if count > size or bytes > maxb or (ttl > 0 and at < now - ttl) then
    redis.call('XDEL', stream, oldest[1])
    count, bytes = count - 1, bytes - len
  else
    break
  end
end
redis.call('HSET', meta, 'b', bytes, 't', ttl)
redis.call('PEXPIRE', meta, ARGV[7])
redis.call('PEXPIRE', stream, ARGV[7])
if ARGV[10] ~= '' then
  redis.call('PUBLISH', ARGV[1], 'r|' .. ARGV[10] .. '|' .. offset)
end
redis.call('PUBLISH', ARGV[1], 'p|' .. epoch .. '|' .. offset .. '|' .. client .. '|' .. data)
if ARGV[9] ~= '' then
  redis.call('SET', idem, epoch .. '|' .. offset, 'PX', ARGV[9])
end
return {epoch, tostring(offset), '0'}
";

/// Reads the position and, consistently with it, history. Writes nothing for a channel that
/// has no epoch (never published, or its keys expired): its position is offset 0 with the
/// empty epoch, so reads of unknown channels create no keys.
pub const HISTORY: &str = r"
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  return {'', '0'}
end
redis.call('PEXPIRE', meta, ARGV[3])
redis.call('PEXPIRE', stream, ARGV[3])
local out = {epoch, tostring(redis.call('HGET', meta, 'o'))}
local limit = tonumber(ARGV[2])
if limit == 0 then
  return out
end
local ttl = tonumber(redis.call('HGET', meta, 't') or '0')
local cutoff = now_ms() - ttl
local entries
if ARGV[1] == '' then
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit)
  entries = {}
  for i = #newest, 1, -1 do
    entries[#entries + 1] = newest[i]
  end
else
  entries = redis.call('XRANGE', stream, '(' .. ARGV[1] .. '-0', '+', 'COUNT', limit)
end
for _, entry in ipairs(entries) do
  local f = entry[2]
  if ttl == 0 or tonumber(f[6]) >= cutoff then
    out[#out + 1] = string.match(entry[1], '^(%d+)')
    out[#out + 1] = f[4]
    out[#out + 1] = f[2]
  end
end
return out
";

/// Adds or refreshes presence entries: ARGV = ttl ms, then id, info pairs.
pub const PRESENCE_ADD: &str = r"
local now = now_ms()
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[i])
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
";

/// Drops at most ARGV[1] expired presence entries. If that many were dropped (more may be
/// left), returns `{"more"}`; otherwise `{"done", info...}` with every live entry.
pub const PRESENCE_READ: &str = r"
local now = now_ms()
local chunk = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, chunk)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[1], unpack(expired))
end
if #expired >= chunk then
  return {'more'}
end
local out = {'done'}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
for i = 1, #live, chunk do
  local ids = {}
  for j = i, math.min(i + chunk - 1, #live) do
    ids[#ids + 1] = live[j]
  end
  local values = redis.call('HMGET', KEYS[1], unpack(ids))
  for _, value in ipairs(values) do
    if value then
      out[#out + 1] = value
    end
  end
end
return out
";
