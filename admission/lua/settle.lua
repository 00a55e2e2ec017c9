-- settle.lua: end a batch of holds of ONE shard (COMMIT, RELEASE, EXPIRE), each with exactly one
-- outbox event written in the same script as the state change (invariant 2).
--
-- KEYS[1] hold expiry zset   KEYS[2] clock offset (tests only)   KEYS[3] outbox stream
-- then per op: hold key, and `nk` more keys: the wallet, then the hold's concurrency counters.
-- ARGV[1] key prefix of the shard ("cg:{cg3}:"), ARGV[2] gateway id, ARGV[3] number of ops;
-- per op: hold id, kind (COMMIT | RELEASE | EXPIRE), amount (-1 = the held amount), nk.
--
-- Result per op: {status, state, amount, held amount, a, b, now_ms}
-- status 0 ended, 1 unknown hold, 2 already ended (state = its end state),
--        3 commit above the hold without overage (nothing changed),
--        4 wrong keys: a = the wallet key, b = the counter keys (space separated); call again,
--        5 EXPIRE of a hold not yet due (nothing changed).
-- The caller may not know a hold's wallet and counters (the sweeper only knows its id), so the
-- script names them instead of reading undeclared keys. A hold's project and counters never
-- change, so the second call cannot be told a different answer.

local prefix, gateway = ARGV[1], ARGV[2]
local nops = tonumber(ARGV[3])
local results = {}
local ki, ai = 4, 4
local END_STATE = {COMMIT = 'COMMITTED', RELEASE = 'RELEASED', EXPIRE = 'EXPIRED'}

for op = 1, nops do
  local hid, kind, amount, nk = ARGV[ai], ARGV[ai + 1], tonumber(ARGV[ai + 2]), tonumber(ARGV[ai + 3])
  ai = ai + 4
  local hold = KEYS[ki]
  local declared = {}
  for j = 1, nk do
    declared[j] = KEYS[ki + j]
  end
  ki = ki + 1 + nk

  local h = redis.call('HMGET', hold, 'p', 'a', 'm', 'r', 'o', 'cq', 'exp', 's')
  local project, held_amount, meter, route = h[1], tonumber(h[2] or '0'), h[3], h[4]
  local overage, cq, exp, state = h[5], h[6] or '', tonumber(h[7] or '0'), h[8]
  if not state then
    results[op] = {1, 'UNKNOWN', 0, 0, '', '', now}
  elseif state ~= 'ACTIVE' then
    results[op] = {2, state, 0, held_amount, '', '', now}
  else
    local wallet = prefix .. 'w:' .. project
    local counters = {}
    for c in string.gmatch(cq, '%S+') do
      counters[#counters + 1] = c
    end
    local ok = nk == 1 + #counters and declared[1] == wallet
    if ok then
      for j, c in ipairs(counters) do
        if declared[j + 1] ~= c then
          ok = false
        end
      end
    end
    local committed = 0
    if kind == 'COMMIT' then
      committed = amount
      if amount < 0 then
        committed = held_amount
      end
    end
    if not ok then
      results[op] = {4, 'ACTIVE', 0, held_amount, wallet, cq, now}
    elseif kind == 'EXPIRE' and exp > now then
      results[op] = {5, 'ACTIVE', 0, held_amount, '', '', now}
    elseif committed > held_amount and overage ~= '1' then
      results[op] = {3, 'ACTIVE', committed, held_amount, '', '', now}
    else
      local end_state = END_STATE[kind]
      if held_amount > 0 then
        redis.call('HINCRBY', wallet, 'held', fmt(-held_amount))
      end
      if committed > 0 then
        redis.call('HINCRBY', wallet, 'uns', fmt(committed))
      end
      for _, c in ipairs(counters) do
        redis.call('DECR', c)
      end
      redis.call('ZREM', KEYS[1], hid)
      redis.call('HSET', hold, 's', end_state)
      -- A tombstone, so that a second commit answers ALREADY_ENDED rather than UNKNOWN.
      redis.call('EXPIRE', hold, 3600)
      -- No MAXLEN: an unsettled event must never be trimmed.
      redis.call('XADD', KEYS[3], '*', 'id', hid, 'k', kind, 'p', project, 'h', hid,
        'ha', fmt(held_amount), 'a', fmt(committed), 'm', meter, 'r', route,
        't', fmt(now), 'g', gateway)
      results[op] = {0, end_state, committed, held_amount, '', '', now}
    end
  end
end

return results
