-- lease.lua: a batch of lease operations (SYNC, CLOSE, EXPIRE) for ONE shard, applied in order;
-- each operation is all-or-nothing (lease mode: the gateway side is admission/lease.py).
--
-- KEYS[1] hold expiry zset (keys.hold_expiry)   KEYS[2] clock offset (keys.clock_offset)
-- KEYS[3] outbox stream (keys.outbox)
-- then per SYNC / CLOSE op: lease hash, wallet, quota_defs, and per quota: rate log, rate sum,
--   concurrency counter (all three per quota because a project override may change its kind);
-- per EXPIRE op: lease hash, then `nk` declared keys: the wallet, then the lease's counters.
-- ARGV[1] key prefix of the shard ("cg:{cg3}:"), ARGV[2] gateway id, ARGV[3] number of ops,
-- ARGV[3 + i] op i as ONE space-separated string (none of the parts contains a space):
--   SYNC|CLOSE lease_id project seq ttl_ms keep want want_min unsettled_limit nq nev
--     then per quota (8): name kind limit window_s used keep want want_min
--     then per event (6): event_id amount held count meter route
--   EXPIRE lease_id nk
--
-- Result per op: {status, now_ms, expires_ms, wallet state, low room, grace_until, amount,
--                 reason, renewed 0/1, wallet_key, counters, nq, then per quota: name,
--                 kind 0=rate 1=concurrency, limit, window_s, granted, remaining, reset_s,
--                 retry_after_s}
-- status 0 OK, 1 COLD, 2 UNKNOWN, 3 NOT_DUE, 4 WRONG_KEYS (wallet_key and counters, space
-- separated, name the keys to declare), 5 STALE.
-- reason 0 none, 3 insufficient credits, 4 grace, 5 expired, 6 backlog (admit.lua's numbers).
-- low room: snap - uns - (held - the lease's amount) - low threshold, 0 when cold: the credits
-- this lease's holds may have in flight before the wallet counts as LOW, as admit.lua decides
-- it (snap - uns - held < low) for holds. The lease's unused credits are not spent; those other
-- gateways lease count as held.
-- A repeated seq returns the reply stored in the lease's `last` field (cjson, every element
-- a string; the client reads numbers with int()).
--
-- Lease hash fields: p project, a credits held, seq, exp, last, cq (counters with a pool), and
-- per quota N: c:N pool, r:N member of the current rate grant, rk:N its units.
--
-- Rate grants are future-stamped log members "<lease_id>.<seq>.<i>g:<units>" at now + ttl_ms;
-- units used since the last sync are re-stamped at now ("...u:<units>"). Carried units (keep)
-- are re-granted without a check only as far as the previous grant member was still counted
-- in the log (not trimmed, lease not renewed): units that are no longer counted anywhere must
-- fit under the limit again like new ones, or a stalled gateway could carry units past the
-- window in which others used the limit (invariant 1).
-- Quota state of names the op does not list is carried over unchanged; a CLOSE that leaves
-- such concurrency pools keeps the lease (a = 0, exp = now) for the sweeper's EXPIRE.
--
-- The clock key exists for the virtual-clock tests only; production never sets it.
-- Numbers written to Redis go through fmt(): Lua numbers are doubles and would otherwise be
-- written in exponent notation.

local GRACE, EXPIRED = 3, 4
local OK, COLD, UNKNOWN, NOT_DUE, WRONG_KEYS, STALE = 0, 1, 2, 3, 4, 5
local R_CREDITS, R_GRACE, R_EXPIRED, R_BACKLOG = 3, 4, 5, 6

local function words(s)
  local out = {}
  for tok in string.gmatch(s or '', '%S+') do
    out[#out + 1] = tok
  end
  return out
end

-- The grant rule: what is wanted, at most half of what is available (but at least want_min),
-- never more than is available.
local function grant_of(want, want_min, avail)
  local g = math.min(want, math.max(want_min, math.floor(avail / 2)))
  return math.max(0, math.min(g, math.max(avail, 0)))
end

local function hash_of(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  return h
end

local function reply(status, exp, state, room, gu, amount, reason, renewed, wk, cq, quotas)
  local r = {status, now, exp, state, room, gu, amount, reason, renewed, wk, cq, #quotas}
  for _, q in ipairs(quotas) do
    local n = #r
    r[n + 1], r[n + 2], r[n + 3], r[n + 4] = q.name, q.kind_n, q.limit, q.win
    r[n + 5], r[n + 6], r[n + 7], r[n + 8] = q.granted, q.remaining, q.reset, q.retry
  end
  return r
end

local function encode_reply(r)
  local s = {}
  for i, v in ipairs(r) do
    if type(v) == 'number' then
      s[i] = fmt(v)
    else
      s[i] = v
    end
  end
  return cjson.encode(s)
end

-- How long a closed lease's tombstone answers a re-sent CLOSE.
local CLOSED_TTL_MS = 3600000

local prefix, gateway = ARGV[1], ARGV[2]
local hx, outbox = KEYS[1], KEYS[3]

local function sync(close, lkey, wallet, qdefs, a, quotas, events)
  local lid, project = a[2], a[3]
  local seq, ttl_ms = tonumber(a[4]), tonumber(a[5])
  local keep, want, want_min = tonumber(a[6]), tonumber(a[7]), tonumber(a[8])
  local unsl_default = tonumber(a[9])
  if close then
    keep, want, want_min = 0, 0, 0
  end

  -- 1. The lease: stale, repeated, renewed or new.
  local L = hash_of(lkey)
  local renewed = 0
  if L.seq then
    local stored = tonumber(L.seq)
    if seq < stored then
      return reply(STALE, 0, 0, 0, 0, 0, 0, 0, '', '', {})
    end
    if seq == stored and L.last then
      return cjson.decode(L.last)
    end
  elseif seq > 1 then
    -- Ended by the sweeper: start afresh; its grant members and pools are accounted already.
    renewed = 1
  end

  -- 2. Events: the commits since the last sync, applied even when cold.
  for _, ev in ipairs(events) do
    if tonumber(ev.amount) > 0 then
      redis.call('HINCRBY', wallet, 'uns', ev.amount)
      -- No MAXLEN: an unsettled event must never be trimmed.
      redis.call('XADD', outbox, '*', 'id', ev.id, 'k', 'COMMIT', 'p', project, 'h', lid,
        'ha', ev.held, 'a', ev.amount, 'm', ev.meter, 'r', ev.route, 't', fmt(now),
        'g', gateway, 'n', ev.count)
    end
  end

  -- 3. Credits: give back the old amount, keep `keep` (forced), grant more.
  local a_old = num(L.a, 0)
  local w = redis.call('HMGET', wallet, 'snap', 'state', 'od', 'gu', 'held', 'uns', 'unsl', 'low')
  local cold = not w[1]
  local snap, state = num(w[1], 0), num(w[2], 0)
  local od, gu = num(w[3], 0), num(w[4], 0)
  local held, uns = num(w[5], 0), num(w[6], 0)
  local unsl, low = num(w[7], unsl_default), num(w[8], 0)
  held = held - a_old + keep
  local grant, reason = 0, 0
  if not cold then
    if state ~= GRACE and state ~= EXPIRED then
      grant = grant_of(want, want_min, math.min(snap + od, unsl) - held - uns)
    end
    if state == EXPIRED then
      reason = R_EXPIRED
    elseif grant < want_min then
      if state == GRACE then
        reason = R_GRACE
      elseif snap + od - held - uns < want_min then
        reason = R_CREDITS
      else
        reason = R_BACKLOG
      end
    end
  end
  held = held + grant
  local amount = keep + grant
  if amount ~= a_old then
    redis.call('HINCRBY', wallet, 'held', fmt(amount - a_old))
  end
  local may_grant = not cold and state ~= EXPIRED

  -- 4. Quotas, with the project's overrides as admit.lua applies them.
  if #quotas > 0 then
    local names = {}
    for i, q in ipairs(quotas) do
      names[i] = q.name
    end
    local overrides = redis.call('HMGET', qdefs, unpack(names))
    for i, q in ipairs(quotas) do
      local ov = overrides[i]
      if ov then
        local k, l, wn = string.match(ov, '^(%a+):(%d+):(%d+)$')
        if k == 'rate' or k == 'concurrency' then
          q.kind, q.limit, q.win = k, tonumber(l), tonumber(wn)
        end
      end
    end
  end

  local fields = {}
  local counters = {}
  local listed = {}
  local function field(k, v)
    local n = #fields
    fields[n + 1], fields[n + 2] = k, v
  end
  for i, q in ipairs(quotas) do
    local name = q.name
    listed[name] = true
    local member, rk = L['r:' .. name], num(L['rk:' .. name], 0)
    local pool_old = num(L['c:' .. name], 0)
    local tag = lid .. '.' .. fmt(seq) .. '.' .. fmt(i)
    if q.kind == 'rate' then
      local win_ms = q.win * 1000
      local sum = load_log(q.log, q.sum_key, win_ms)
      -- Units of the previous grant that are still counted may be carried without a check.
      local backed = 0
      if member and redis.call('ZREM', q.log, member) == 1 then
        sum = math.max(0, sum - rk)
        backed = math.max(0, rk - q.used)
      end
      if pool_old > 0 then
        redis.call('DECRBY', q.counter, fmt(pool_old))
      end
      local forced = math.min(q.keep, backed)
      local extra = q.keep - forced
      if q.used > 0 then
        redis.call('ZADD', q.log, now, tag .. 'u:' .. fmt(q.used))
        sum = sum + q.used
      end
      local need = 0
      if q.want_min > 0 then
        need = extra + q.want_min
      end
      local avail = q.limit - sum - forced
      local new = 0
      if may_grant then
        new = grant_of(q.want + extra, need, avail)
      end
      local granted = forced + new
      if granted > 0 then
        local gm = tag .. 'g:' .. fmt(granted)
        redis.call('ZADD', q.log, now + ttl_ms, gm)
        sum = sum + granted
        field('r:' .. name, gm)
        field('rk:' .. name, fmt(granted))
      end
      local oldest = oldest_of(q.log)
      local reset = 0
      if oldest then
        redis.call('SET', q.sum_key, fmt(sum), 'KEEPTTL')
        local keep_ms = win_ms + ttl_ms + 1000
        extend_ttl(q.log, keep_ms)
        extend_ttl(q.sum_key, keep_ms)
        reset = reset_s(oldest, win_ms, now)
      else
        redis.call('DEL', q.sum_key)
      end
      local retry = 0
      if new < need then
        retry = math.max(1, ceil_s(wait_for(q.log, sum, need, q.limit, win_ms)))
      end
      q.kind_n, q.granted, q.reset, q.retry = 0, granted, reset, retry
      q.remaining = math.max(0, q.limit - sum)
    else
      if member and redis.call('ZREM', q.log, member) == 1 then
        -- The quota was a rate quota at the last sync (an override changed its kind).
        if oldest_of(q.log) then
          local s = math.max(0, tonumber(redis.call('GET', q.sum_key) or '0') - rk)
          redis.call('SET', q.sum_key, fmt(s), 'KEEPTTL')
        else
          redis.call('DEL', q.sum_key)
        end
      end
      local counter = tonumber(redis.call('GET', q.counter) or '0') - pool_old
      -- Slots of the previous pool may be kept without a check; anything more the gateway
      -- keeps (e.g. rate units, after an override changed the kind) must fit like new ones.
      -- (A renewed lease has no previous pool: the gateway's requests in flight hold their
      -- slots for real, so its keep is taken as it is, like the keep of credits.)
      local forced = q.keep
      if renewed == 0 then
        forced = math.min(q.keep, pool_old)
      end
      local extra = q.keep - forced
      local need = 0
      if q.want_min > 0 then
        need = extra + q.want_min
      end
      local new = 0
      if may_grant then
        new = grant_of(q.want + extra, need, q.limit - counter - forced)
      end
      local pool = forced + new
      if pool ~= pool_old then
        redis.call('INCRBY', q.counter, fmt(pool - pool_old))
      end
      if pool > 0 then
        field('c:' .. name, fmt(pool))
        counters[#counters + 1] = q.counter
      end
      local retry = 0
      if new < need then
        retry = 1
      end
      q.kind_n, q.win, q.granted, q.reset, q.retry = 1, 0, pool, 0, retry
      q.remaining = math.max(0, q.limit - counter - pool)
    end
  end

  -- Quota state of names this op does not list: carried over unchanged.
  local left_pools = {}
  local left_counters = {}
  for k, v in pairs(L) do
    local kind, name = string.match(k, '^(%a+):(.+)$')
    if (kind == 'c' or kind == 'r' or kind == 'rk') and not listed[name] then
      field(k, v)
      if kind == 'c' and num(v, 0) > 0 then
        left_pools[#left_pools + 1] = {k, v}
        local ck = prefix .. 'c:' .. project .. ':' .. name
        counters[#counters + 1] = ck
        left_counters[#left_counters + 1] = ck
      end
    end
  end

  local low_room = 0
  if not cold then
    low_room = snap - uns - (held - amount) - low
  end
  local status = OK
  if cold then
    status = COLD
  end

  -- 5. Store the lease (or end it: CLOSE).
  if close then
    local r = reply(status, 0, state, low_room, gu, 0, reason, renewed, '', '', quotas)
    if #left_pools == 0 then
      -- A tombstone, so that a CLOSE re-sent after a lost reply gets this reply again instead
      -- of applying its events twice (lease ids are never reused).
      redis.call('DEL', lkey)
      redis.call('HSET', lkey, 'seq', fmt(seq), 'closed', '1', 'last', encode_reply(r))
      redis.call('PEXPIRE', lkey, CLOSED_TTL_MS)
      redis.call('ZREM', hx, lid)
    else
      -- Pools of quotas the CLOSE did not list: the sweeper ends them (EXPIRE, due now).
      redis.call('DEL', lkey)
      local keepf = {'p', project, 'a', '0', 'seq', fmt(seq), 'exp', fmt(now),
                     'cq', table.concat(left_counters, ' '), 'last', encode_reply(r)}
      for _, kv in ipairs(left_pools) do
        keepf[#keepf + 1] = kv[1]
        keepf[#keepf + 1] = kv[2]
      end
      redis.call('HSET', lkey, unpack(keepf))
      redis.call('ZADD', hx, now, lid)
    end
    return r
  end
  local exp = now + ttl_ms
  local r = reply(status, exp, state, low_room, gu, amount, reason, renewed, '', '', quotas)
  redis.call('DEL', lkey)
  redis.call('HSET', lkey, 'p', project, 'a', fmt(amount), 'seq', fmt(seq), 'exp', fmt(exp),
    'cq', table.concat(counters, ' '), 'last', encode_reply(r), unpack(fields))
  redis.call('ZADD', hx, exp, lid)
  return r
end

local function expire(lkey, lid, declared)
  local L = hash_of(lkey)
  if not L.seq or L.closed or not L.p then
    -- Missing, or a CLOSE tombstone (closed after the sweeper read its id).
    return reply(UNKNOWN, 0, 0, 0, 0, 0, 0, 0, '', '', {})
  end
  if num(L.exp, 0) > now then
    return reply(NOT_DUE, 0, 0, 0, 0, 0, 0, 0, '', '', {})
  end
  local project, cq = L.p, L.cq or ''
  local wallet = prefix .. 'w:' .. project
  local counters = words(cq)
  local ok = #declared == 1 + #counters and declared[1] == wallet
  if ok then
    for j, c in ipairs(counters) do
      if declared[j + 1] ~= c then
        ok = false
      end
    end
  end
  if not ok then
    return reply(WRONG_KEYS, 0, 0, 0, 0, 0, 0, 0, wallet, cq, {})
  end
  local amount = num(L.a, 0)
  if amount ~= 0 then
    redis.call('HINCRBY', wallet, 'held', fmt(-amount))
  end
  local base = prefix .. 'c:' .. project .. ':'
  for _, c in ipairs(counters) do
    if string.sub(c, 1, #base) == base then
      local pool = num(L['c:' .. string.sub(c, #base + 1)], 0)
      if pool > 0 then
        redis.call('DECRBY', c, fmt(pool))
      end
    end
  end
  -- The rate grant members stay in the logs: stamped at the lease's exp, the units a dead
  -- gateway may have used count until they leave the window.
  -- `ha` is informational (an EXPIRE charges nothing); the authority takes at most 10^15.
  redis.call('XADD', outbox, '*', 'id', lid .. '.x', 'k', 'EXPIRE', 'p', project, 'h', lid,
    'ha', fmt(math.min(amount, 1e15)), 'a', '0', 't', fmt(now), 'g', gateway, 'n', '0')
  redis.call('DEL', lkey)
  redis.call('ZREM', hx, lid)
  return reply(OK, 0, 0, 0, 0, 0, 0, 0, '', '', {})
end

local nops = tonumber(ARGV[3])
-- A malformed batch is refused before anything is written.
for op = 1, nops do
  local kind = string.match(ARGV[3 + op], '^(%S+)')
  if kind ~= 'SYNC' and kind ~= 'CLOSE' and kind ~= 'EXPIRE' then
    return redis.error_reply('lease.lua: unknown op ' .. tostring(kind))
  end
end

local results = {}
local ki = 4
for op = 1, nops do
  local a = words(ARGV[3 + op])
  if a[1] == 'EXPIRE' then
    local nk = tonumber(a[3])
    local declared = {}
    for j = 1, nk do
      declared[j] = KEYS[ki + j]
    end
    results[op] = expire(KEYS[ki], a[2], declared)
    ki = ki + 1 + nk
  else
    local lkey, wallet, qdefs = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
    ki = ki + 3
    local nq, nev = tonumber(a[10]), tonumber(a[11])
    local close = a[1] == 'CLOSE'
    local quotas = {}
    for q = 1, nq do
      local b = 12 + (q - 1) * 8
      local qo = {name = a[b], kind = a[b + 1], limit = tonumber(a[b + 2]),
                  win = tonumber(a[b + 3]), used = tonumber(a[b + 4]), keep = tonumber(a[b + 5]),
                  want = tonumber(a[b + 6]), want_min = tonumber(a[b + 7]),
                  log = KEYS[ki], sum_key = KEYS[ki + 1], counter = KEYS[ki + 2]}
      if close then
        qo.keep, qo.want, qo.want_min = 0, 0, 0
      end
      quotas[q] = qo
      ki = ki + 3
    end
    local events = {}
    for e = 1, nev do
      local b = 12 + nq * 8 + (e - 1) * 6
      events[e] = {id = a[b], amount = a[b + 1], held = a[b + 2], count = a[b + 3],
                   meter = a[b + 4], route = a[b + 5]}
    end
    results[op] = sync(close, lkey, wallet, qdefs, a, quotas, events)
  end
end

return results
