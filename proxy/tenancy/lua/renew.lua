-- Extend the lease of a reservation still in flight (or put it back if Redis lost it).
-- KEYS: the period's reservations.  ARGV: reservation id, tokens, lease seconds, period end.
local now = tonumber(redis.call('TIME')[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
redis.call('EXPIREAT', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[3]))
return 1
