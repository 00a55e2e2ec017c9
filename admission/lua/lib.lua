-- lib.lua: shared by admit.lua, settle.lua, sweep.lua and lease.lua; the store prepends it to
-- each of them when it registers the script (Redis scripts cannot include files).
--
-- Defines `now` (ms): Redis TIME, or the test clock in KEYS[2] (every one of these scripts
-- takes the shard's clock key as KEYS[2]): "=MS" freezes time at MS, a plain number shifts it.
-- Production never sets the clock key. Numbers written to Redis go through fmt(): Lua numbers
-- are doubles and would otherwise be written in exponent notation.

local function fmt(n)
  return string.format('%d', n)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The test clock (KEYS[2]): "=MS" freezes time at MS, a plain number shifts Redis time.
local clock = redis.call('GET', KEYS[2])
if clock then
  if string.sub(clock, 1, 1) == '=' then
    now = tonumber(string.sub(clock, 2))
  else
    now = now + tonumber(clock)
  end
end

-- A wallet field as a number; missing or empty (e.g. unsl left to the policy) gives `default`.
local function num(v, default)
  local n = v and tonumber(v)
  if not n then
    return default
  end
  return n
end

local function weight_of(member)
  return tonumber(string.match(member, ':(%d+)$'))
end

local function oldest_of(log)
  local o = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if #o == 0 then
    return nil
  end
  return tonumber(o[2])
end

-- The weight sum inside the window and the oldest entry's time (nil: empty), after dropping
-- entries that left the window.
local function load_log(log, sum_key, win_ms)
  local oldest = oldest_of(log)
  if not oldest then
    return 0, nil
  end
  local sum = tonumber(redis.call('GET', sum_key) or '0')
  local cutoff = now - win_ms
  if oldest > cutoff then
    return sum, oldest
  end
  local gone = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)) do
    gone = gone + weight_of(m)
  end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
  oldest = oldest_of(log)
  if not oldest then
    redis.call('DEL', sum_key)
    return 0, nil
  end
  sum = sum - gone
  redis.call('SET', sum_key, fmt(sum), 'KEEPTTL')
  return sum, oldest
end

-- ms until enough of the oldest entries leave the window for `w` more to fit under `limit`.
local function wait_for(log, sum, w, limit, win_ms)
  if w > limit then
    return win_ms
  end
  local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  local left = sum
  for i = 1, #entries, 2 do
    left = left - weight_of(entries[i])
    if left + w <= limit then
      return tonumber(entries[i + 1]) + win_ms - now
    end
  end
  return win_ms
end

local function ceil_s(ms)
  return math.ceil(ms / 1000)
end

-- Seconds until the oldest counted entry leaves a window of win_ms: the RateLimit `t`. Never
-- more than the window: a lease's grant is stamped at the lease's expiry (lease.lua), possibly
-- ahead of now, while any unit really used by now leaves the window within one window.
local function reset_s(oldest, win_ms, now)
  return math.min(ceil_s(win_ms), math.max(0, ceil_s(oldest + win_ms - now)))
end

-- Never shortens a TTL: a lease's grant in the same log may be stamped in the future (lease.lua).
local function extend_ttl(key, ms)
  local pt = redis.call('PTTL', key)
  if pt == -1 or (pt >= 0 and pt < ms) then
    redis.call('PEXPIRE', key, ms)
  end
end

