-- Reserve tokens against a key's quota for one period, atomically across gateways.
-- KEYS: the period's account (hash: used), its reservations (hash: id -> "tokens expiry").
-- ARGV: quota, tokens (-1: whatever is left), used per the key store ('' if not read yet),
--       reservation id, lease seconds, period end (epoch seconds).
-- Returns {-1} when the account is new and the store must be read first, {1, tokens} when
-- reserved, {0, left} when the request does not fit.
local now = tonumber(redis.call('TIME')[1])
if redis.call('HEXISTS', KEYS[1], 'used') == 0 then
  if ARGV[3] == '' then return {-1} end
  redis.call('HSET', KEYS[1], 'used', ARGV[3])
  redis.call('EXPIREAT', KEYS[1], ARGV[6])
end
-- Leases a crashed gateway left behind lapse; live ones are renewed by their gateway.
local reserved = 0
local held = redis.call('HGETALL', KEYS[2])
for i = 1, #held, 2 do
  local tokens, expiry = string.match(held[i + 1], '(%d+) (%d+)')
  if tonumber(expiry) < now then
    redis.call('HDEL', KEYS[2], held[i])
  else
    reserved = reserved + tonumber(tokens)
  end
end
local left = tonumber(ARGV[1]) - tonumber(redis.call('HGET', KEYS[1], 'used')) - reserved
local want = tonumber(ARGV[2])
if want < 0 then want = math.max(left, 0) end
if left <= 0 or want > left then return {0, left} end
redis.call('HSET', KEYS[2], ARGV[4], want .. ' ' .. (now + tonumber(ARGV[5])))
redis.call('EXPIREAT', KEYS[2], tonumber(ARGV[6]) + tonumber(ARGV[5]))
return {1, want}
