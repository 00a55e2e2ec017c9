-- Apply an authority snapshot to one project's cached wallet and quota overrides.
--
-- KEYS[1] wallet hash, KEYS[2] quota_defs hash (same hash tag).
-- ARGV[1] mode:
--   "fill"   ARGV[2..7] snap ver state low od gu, ARGV[8] unsl ("" = leave it to the engine's
--            configured default), ARGV[9..] quota name/value pairs: creates the wallet when
--            missing, replaces the quota overrides.
--   "repair" as "fill", but also rewrites a wallet of the same version (reconcile).
--   "reset"  as "fill", whatever the cached version (Watch resync: the authority's history
--            may have changed, e.g. restored from another database).
--   "offer"  as "fill", only when the wallet is not cached (a snapshot that came with a key
--            resolution: a project already cached is kept as it is).
--   "wallet" ARGV[2..7] snap ver state low od gu: only for a cached wallet.
--   "qset"   ARGV[2] name, ARGV[3] "kind:limit:window_seconds": only for a cached wallet.
--   "qdel"   ARGV[2] name: only for a cached wallet.
-- Wallet fields are written only when the version is newer than the cached one, so an old
-- snapshot never overwrites a newer one. held and uns of an existing wallet are never touched:
-- they are this tier's own counters, not the authority's.
-- Returns {cached_before (0/1), wallet_written (0/1)}.

local wallet, qdefs = KEYS[1], KEYS[2]
local mode = ARGV[1]
local cached = redis.call('EXISTS', wallet)

local function write_wallet()
  local ver = tonumber(ARGV[3])
  local stored = tonumber(redis.call('HGET', wallet, 'ver') or '-1') or -1
  if cached == 1 and mode ~= 'reset' and (ver < stored or (ver == stored and mode ~= 'repair')) then
    return 0
  end
  redis.call('HSET', wallet, 'snap', ARGV[2], 'ver', ARGV[3], 'state', ARGV[4],
    'low', ARGV[5], 'od', ARGV[6], 'gu', ARGV[7])
  return 1
end

if mode == 'offer' then
  if cached == 1 then
    return {1, 0}
  end
  mode = 'fill'
end

if mode == 'fill' or mode == 'repair' or mode == 'reset' then
  local written = write_wallet()
  if cached == 0 then
    redis.call('HSET', wallet, 'held', 0, 'uns', 0)
  end
  if ARGV[8] ~= '' then
    redis.call('HSET', wallet, 'unsl', ARGV[8])
  end
  redis.call('DEL', qdefs)
  if #ARGV >= 10 then
    redis.call('HSET', qdefs, unpack(ARGV, 9))
  end
  return {cached, written}
end

if cached == 0 then
  return {0, 0}
end
if mode == 'wallet' then
  return {1, write_wallet()}
elseif mode == 'qset' then
  redis.call('HSET', qdefs, ARGV[2], ARGV[3])
  return {1, 0}
elseif mode == 'qdel' then
  redis.call('HDEL', qdefs, ARGV[2])
  return {1, 0}
end
return redis.error_reply('apply_snapshot: unknown mode ' .. tostring(mode))
