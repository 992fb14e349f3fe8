-- Debit the tokens a finished request used from its key's tokens bucket (may go negative).
-- KEYS: tokens bucket.  ARGV: tpm, tokens, window seconds.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, tokens, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'stamp')
local level, stamp = tonumber(v[1]), tonumber(v[2])
if level == nil then level, stamp = limit, now end
level = math.min(limit, level + (now - stamp) * limit / window) - tokens
redis.call('HSET', KEYS[1], 'level', tostring(level), 'stamp', tostring(now), 'limit', limit)
redis.call('EXPIRE', KEYS[1], math.ceil(window * (limit - level) / limit) + 1)
return 1
