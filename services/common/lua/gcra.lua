-- Generic cell rate algorithm: one key per principal and method holds the theoretical
-- arrival time (TAT) of the next request, shared by every replica.
-- KEYS[1] the TAT key
-- ARGV: 1 now (ms), 2 emission interval (ms per request), 3 burst tolerance (ms)
-- Returns {allowed (0/1), retry after (ms)}
local now, interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + interval
local allow_at = next_tat - tolerance
if now < allow_at then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil(next_tat - now) + 1000)
return {1, 0}
