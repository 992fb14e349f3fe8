-- Replace a reservation by what the request spent.
-- KEYS: the period's account, its reservations.  ARGV: reservation id, tokens spent.
-- An account Redis lost is left unmade: the next reservation reads it from the key store.
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'used') == 1 then
  redis.call('HINCRBY', KEYS[1], 'used', ARGV[2])
end
return 1
