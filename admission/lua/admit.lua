-- admit.lua: a batch of admissions for ONE shard; each operation is all-or-nothing.
--
-- KEYS[1] hold expiry zset (keys.hold_expiry)      KEYS[2] clock offset (keys.clock_offset)
-- then per op: wallet, quota_defs, hold, and per quota: rate log, rate sum, concurrency counter
-- (all three per quota because a project override may change the quota's kind).
-- ARGV[1] number of ops; ARGV[1 + i] op i as ONE space-separated string (fewer arguments to
-- encode per call is most of the client's cost): project, op id (= hold id), cost, weight,
-- ttl_ms, meter, route, overage 0/1, default unsettled limit, number of quotas, then per quota:
-- name, kind, limit, window_s. None of these contain spaces (see admission.policy).
--
-- Result per op: {status, reason, retry_after_s, wallet state, low 0/1, grace_until, hold 0/1,
--                 now_ms, then per quota: kind 0=rate 1=concurrency, limit, window_s, remaining,
--                 reset_s}   (now_ms: the script's clock, for the reference-model tests)
-- status 0 admitted, 1 denied (nothing changed), 2 cold (no wallet snapshot: fill and retry).
-- reason 0 none, 1 rate, 2 concurrency, 3 insufficient credits, 4 grace, 5 expired, 6 backlog.
--
-- Rate quotas are an exact sliding window log: a sorted set of admitted entries (score = ms,
-- member = "<op id>:<weight>") plus the running weight sum in its own key; an entry counts
-- while now - score < window. Each redis.call costs more than the Lua around it, so the common
-- path reads the oldest entry once and trims only when it has left the window.
--
-- The clock key exists for the virtual-clock tests only; production never sets it.
-- Numbers written to Redis go through fmt(): Lua numbers are doubles and would otherwise be
-- written in exponent notation.

local GRACE, EXPIRED = 3, 4

local results = {}
local ki = 3
local nops = tonumber(ARGV[1])

for op = 1, nops do
  local wallet, qdefs, hold = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
  ki = ki + 3
  local a = {}
  for tok in string.gmatch(ARGV[op + 1], '%S+') do
    a[#a + 1] = tok
  end
  local project, hid = a[1], a[2]
  local cost, weight = tonumber(a[3]), tonumber(a[4])
  local ttl_ms, meter, route = tonumber(a[5]), a[6], a[7]
  local overage, unsl_default = a[8], tonumber(a[9])
  local nq = tonumber(a[10])

  -- Effective quotas: a project override in quota_defs replaces the route default.
  local quotas = {}
  local names = {}
  for q = 1, nq do
    local b = 11 + (q - 1) * 4
    names[q] = a[b]
    quotas[q] = {name = a[b], kind = a[b + 1], limit = tonumber(a[b + 2]),
                 win = tonumber(a[b + 3]), log = KEYS[ki], sum_key = KEYS[ki + 1],
                 counter = KEYS[ki + 2]}
    ki = ki + 3
  end
  if nq > 0 then
    local overrides = redis.call('HMGET', qdefs, unpack(names))
    for q = 1, nq do
      local ov = overrides[q]
      if ov then
        local k, l, w = string.match(ov, '^(%a+):(%d+):(%d+)$')
        if k == 'rate' or k == 'concurrency' then
          quotas[q].kind, quotas[q].limit, quotas[q].win = k, tonumber(l), tonumber(w)
        end
      end
    end
  end

  local w = redis.call('HMGET', wallet, 'snap', 'state', 'od', 'gu', 'held', 'uns', 'unsl', 'low')
  if not w[1] then
    -- No snapshot (never filled, or only counters left after an eviction): cold.
    results[op] = {2, 0, 0, 0, 0, 0, 0, now}
  else
    local snap, state = num(w[1], 0), num(w[2], 0)
    local od, gu = num(w[3], 0), num(w[4], 0)
    local held, uns = num(w[5], 0), num(w[6], 0)
    local unsl, low = num(w[7], unsl_default), num(w[8], 0)

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
        q.used, q.oldest = load_log(q.log, q.sum_key, win_ms)
        if q.used + weight > q.limit then
          local wait = math.max(1, ceil_s(wait_for(q.log, q.used, weight, q.limit, win_ms)))
          if reason == 0 then
            reason = 1
          end
          if reason == 1 or reason == 2 then
            retry = math.max(retry, wait)
          end
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
        end
      end
    end

    local admitted = reason == 0
    local made_hold = 0
    if admitted then
      local counters = {}
      for _, q in ipairs(quotas) do
        if q.kind == 'rate' then
          local ttl = q.win * 1000 + 1000
          redis.call('ZADD', q.log, now, hid .. ':' .. fmt(weight))
          extend_ttl(q.log, ttl)
          q.used = q.used + weight
          redis.call('SET', q.sum_key, fmt(q.used), 'KEEPTTL')
          extend_ttl(q.sum_key, ttl)
          if not q.oldest then
            q.oldest = now
          end
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
    local n = 8
    for _, q in ipairs(quotas) do
      local remaining = math.max(0, q.limit - q.used)
      if q.kind == 'rate' then
        local reset = 0
        if q.oldest then
          reset = reset_s(q.oldest, q.win * 1000, now)
        end
        res[n + 1], res[n + 2], res[n + 3], res[n + 4], res[n + 5] =
          0, q.limit, q.win, remaining, reset
      else
        res[n + 1], res[n + 2], res[n + 3], res[n + 4], res[n + 5] = 1, q.limit, 0, remaining, 0
      end
      n = n + 5
    end
    results[op] = res
  end
end

return results
