-- sweep.lua: the ids of holds of ONE shard whose expiry (Redis time) has passed, oldest first.
--
-- KEYS[1] hold expiry zset   KEYS[2] clock offset (tests only: the virtual clock)
-- ARGV[1] the most ids to return. Returns {now_ms, {hold ids}}.
-- Ending them goes through settle.lua with kind EXPIRE, which re-checks that each is still
-- ACTIVE and due and names the wallet and counter keys it needs (see settle.lua).

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
return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))}
