-- sweep.lua: the ids of holds of ONE shard whose expiry (Redis time) has passed, oldest first.
--
-- KEYS[1] hold expiry zset   KEYS[2] clock offset (tests only: the virtual clock)
-- ARGV[1] the most ids to return. Returns {now_ms, {hold ids}}.
-- Ending them goes through settle.lua with kind EXPIRE, which re-checks that each is still
-- ACTIVE and due and names the wallet and counter keys it needs (see settle.lua).

return {now, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))}
