-- Admit one request against a key's requests- and tokens-per-minute buckets, atomically.
-- The same token bucket as proxy/tenancy/limits.py: up to `limit` units, refilled at `limit` per
-- window, continuously. Time is Redis's own clock, so gateways' clocks need not agree.
-- KEYS: requests bucket, tokens bucket.  ARGV: rpm, tpm (0: no limit), window seconds.
-- Returns {allowed (1/0), reason, requests level, tokens level} (levels as text, '' if none).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[3])

local function load(key, limit)
  if limit <= 0 then return nil end
  local v = redis.call('HMGET', key, 'level', 'stamp', 'limit')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil then return limit end
  if tonumber(v[3]) ~= limit then level = math.min(level, limit) end
  return math.min(limit, level + (now - stamp) * limit / window)
end

local function save(key, limit, level)
  if level == nil then return end
  redis.call('HSET', key, 'level', tostring(level), 'stamp', tostring(now), 'limit', limit)
  -- A bucket left alone refills; once full, forgetting it is the same as keeping it.
  redis.call('EXPIRE', key, math.ceil(window * (limit - level) / limit) + 1)
end

local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local req, tok = load(KEYS[1], rpm), load(KEYS[2], tpm)
local allowed, reason = 1, ''
if req ~= nil and req < 1 then
  allowed, reason = 0, 'requests'
elseif tok ~= nil and tok <= 0 then
  allowed, reason = 0, 'tokens'
elseif req ~= nil then
  req = req - 1
end
save(KEYS[1], rpm, req)
save(KEYS[2], tpm, tok)
return {allowed, reason, req and tostring(req) or '', tok and tostring(tok) or ''}
