-- admit.lua: a batch of admissions for ONE shard; each operation is all-or-nothing.
--
-- KEYS[1] hold expiry zset (keys.hold_expiry)      KEYS[2] clock offset (keys.clock_offset)
-- then per op: wallet, quota_defs, hold, and per quota: rate log, rate sum, concurrency counter
-- ARGV[1] number of ops; per op:
--   project, op id (= hold id), cost, weight, ttl_ms, meter, route, overage 0/1,
--   default unsettled limit, number of quotas, then per quota: name, kind, limit, window_s
--
-- Result per op: {status, reason, retry_after_s, wallet state, low 0/1, grace_until, hold 0/1,
--                 now_ms, then per quota: kind 0=rate 1=concurrency, limit, window_s, remaining,
--                 reset_s}   (now_ms: the script's clock, for the reference-model tests)
-- status 0 admitted, 1 denied (nothing changed), 2 cold (no wallet snapshot: fill and retry).
-- reason 0 none, 1 rate, 2 concurrency, 3 insufficient credits, 4 grace, 5 expired, 6 backlog.
--
-- The clock offset key exists for the virtual-clock tests only; production never sets it.
-- Numbers written to Redis go through fmt(): Lua numbers are doubles and would otherwise be
-- written in exponent notation.

local GRACE, EXPIRED = 3, 4

local function fmt(n)
  return string.format('%d', n)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local offset = redis.call('GET', KEYS[2])
if offset then
  now = now + tonumber(offset)
end

local function weight_of(member)
  return tonumber(string.match(member, ':(%d+)$'))
end

-- Drop log entries that left the window; returns the weight sum still inside it.
local function trim(log, sum_key, win_ms)
  local cutoff = now - win_ms
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  local sum = tonumber(redis.call('GET', sum_key) or '0')
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do
      gone = gone + weight_of(m)
    end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    sum = sum - gone
    if redis.call('ZCARD', log) == 0 then
      sum = 0
      redis.call('DEL', sum_key)
    else
      redis.call('SET', sum_key, fmt(sum), 'KEEPTTL')
    end
  end
  return sum
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

local results = {}
local ki = 3
local ai = 2
local nops = tonumber(ARGV[1])

for op = 1, nops do
  local wallet, qdefs, hold = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
  ki = ki + 3
  local project, hid = ARGV[ai], ARGV[ai + 1]
  local cost, weight = tonumber(ARGV[ai + 2]), tonumber(ARGV[ai + 3])
  local ttl_ms, meter, route = tonumber(ARGV[ai + 4]), ARGV[ai + 5], ARGV[ai + 6]
  local overage, unsl_default = ARGV[ai + 7], tonumber(ARGV[ai + 8])
  local nq = tonumber(ARGV[ai + 9])
  ai = ai + 10

  -- Effective quotas: a project override in quota_defs replaces the route default.
  local quotas = {}
  for q = 1, nq do
    local name, kind = ARGV[ai], ARGV[ai + 1]
    local limit, win = tonumber(ARGV[ai + 2]), tonumber(ARGV[ai + 3])
    ai = ai + 4
    local ov = redis.call('HGET', qdefs, name)
    if ov then
      local k, l, w = string.match(ov, '^(%a+):(%d+):(%d+)$')
      if k == 'rate' or k == 'concurrency' then
        kind, limit, win = k, tonumber(l), tonumber(w)
      end
    end
    quotas[q] = {name = name, kind = kind, limit = limit, win = win,
                 log = KEYS[ki], sum_key = KEYS[ki + 1], counter = KEYS[ki + 2]}
    ki = ki + 3
  end

  if redis.call('EXISTS', wallet) == 0 then
    results[op] = {2, 0, 0, 0, 0, 0, 0, now}
  else
    local w = redis.call('HMGET', wallet, 'snap', 'state', 'od', 'gu', 'held', 'uns', 'unsl', 'low')
    local snap, state = tonumber(w[1] or '0'), tonumber(w[2] or '0')
    local od, gu = tonumber(w[3] or '0'), tonumber(w[4] or '0')
    local held, uns = tonumber(w[5] or '0'), tonumber(w[6] or '0')
    local unsl, low = tonumber(w[7] or unsl_default), tonumber(w[8] or '0')

    local reason, retry = 0, 0
    if state == EXPIRED then
      reason = 5
    elseif cost > 0 and state == GRACE then
      reason = 4
    elseif cost > 0 and held + uns + cost > snap + od then
      reason = 3
    elseif cost > 0 and uns + held + cost > unsl then
      reason = 6
    end

    -- Every quota is evaluated (even after a wallet denial) so the caller gets its headers.
    for _, q in ipairs(quotas) do
      if q.kind == 'rate' then
        local win_ms = q.win * 1000
        q.used = trim(q.log, q.sum_key, win_ms)
        if q.used + weight > q.limit then
          local wait = math.max(1, ceil_s(wait_for(q.log, q.used, weight, q.limit, win_ms)))
          if reason == 0 then
            reason = 1
          end
          if reason == 1 or reason == 2 then
            retry = math.max(retry, wait)
          end
          q.denied = true
        end
      else
        q.used = tonumber(redis.call('GET', q.counter) or '0')
        if q.used + 1 > q.limit then
          if reason == 0 then
            reason = 2
          end
          if reason == 1 or reason == 2 then
            retry = math.max(retry, 1)
          end
          q.denied = true
        end
      end
    end

    local admitted = reason == 0
    local made_hold = 0
    if admitted then
      local counters = {}
      for _, q in ipairs(quotas) do
        if q.kind == 'rate' then
          local win_ms = q.win * 1000
          redis.call('ZADD', q.log, now, hid .. ':' .. fmt(weight))
          redis.call('INCRBY', q.sum_key, weight)
          redis.call('PEXPIRE', q.log, win_ms + 1000)
          redis.call('PEXPIRE', q.sum_key, win_ms + 1000)
          q.used = q.used + weight
        else
          redis.call('INCR', q.counter)
          counters[#counters + 1] = q.counter
          q.used = q.used + 1
        end
      end
      if cost > 0 or #counters > 0 then
        local exp = now + ttl_ms
        redis.call('HSET', hold, 'p', project, 'a', fmt(cost), 'm', meter, 'r', route,
          'o', overage, 'cq', table.concat(counters, ' '), 'exp', fmt(exp), 's', 'ACTIVE')
        redis.call('ZADD', KEYS[1], exp, hid)
        if cost > 0 then
          redis.call('HINCRBY', wallet, 'held', fmt(cost))
          held = held + cost
        end
        made_hold = 1
      end
    end

    local low_flag = 0
    if snap - uns - held < low then
      low_flag = 1
    end
    local res = {admitted and 0 or 1, reason, retry, state, low_flag, gu, made_hold, now}
    for _, q in ipairs(quotas) do
      local remaining = math.max(0, q.limit - q.used)
      if q.kind == 'rate' then
        local reset = 0
        local oldest = redis.call('ZRANGE', q.log, 0, 0, 'WITHSCORES')
        if #oldest > 0 then
          reset = math.max(0, ceil_s(tonumber(oldest[2]) + q.win * 1000 - now))
        end
        for _, v in ipairs({0, q.limit, q.win, remaining, reset}) do
          res[#res + 1] = v
        end
      else
        for _, v in ipairs({1, q.limit, 0, remaining, 0}) do
          res[#res + 1] = v
        end
      end
    end
    results[op] = res
  end
end

return results
