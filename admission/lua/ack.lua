-- Acknowledge settled outbox entries of one shard, exactly once, and apply the reply's wallets.
--
-- KEYS[1] the shard's outbox stream, KEYS[2..] wallet hashes of the shard's projects.
-- ARGV[1] consumer group, ARGV[2] n entries, then n triples:
--   entry id, index into KEYS of its wallet, committed amount to take off uns.
-- then m, then m septuples: index into KEYS of the wallet, snap ver state low od gu.
-- uns is decremented only where XACK returned 1: when two flushers race on a reclaimed entry
-- only one of them acknowledges it, so the amount leaves uns exactly once. A wallet missing in
-- Redis (evicted, never cached) is not recreated here: the next cache fill creates it whole.
-- Returns {acked, amount taken off uns, wallets written, uns clamped at 0 (should stay 0)}.

local stream, group = KEYS[1], ARGV[1]
local n = tonumber(ARGV[2])
local acked, taken, written, clamped = 0, 0, 0, 0
local i = 3
for _ = 1, n do
  local id, widx, amount = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  if redis.call('XACK', stream, group, id) == 1 then
    acked = acked + 1
    local wallet = KEYS[widx]
    if amount > 0 and redis.call('EXISTS', wallet) == 1 then
      local uns = tonumber(redis.call('HGET', wallet, 'uns') or '0') or 0
      if uns < amount then
        clamped = clamped + 1
        amount = uns
      end
      redis.call('HINCRBY', wallet, 'uns', -amount)
      taken = taken + amount
    end
  end
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  local wallet = KEYS[tonumber(ARGV[i])]
  if redis.call('EXISTS', wallet) == 1 then
    local stored = tonumber(redis.call('HGET', wallet, 'ver') or '-1') or -1
    if tonumber(ARGV[i + 2]) > stored then
      redis.call('HSET', wallet, 'snap', ARGV[i + 1], 'ver', ARGV[i + 2], 'state', ARGV[i + 3],
        'low', ARGV[i + 4], 'od', ARGV[i + 5], 'gu', ARGV[i + 6])
      written = written + 1
    end
  end
  i = i + 7
end
return {acked, taken, written, clamped}
