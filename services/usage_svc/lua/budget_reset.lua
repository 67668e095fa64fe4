-- Reset a budget's current period to zero and re-arm its alert thresholds.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 budget id, 2 now (ms), 3 who
-- Returns 'OK' | 'NOT_FOUND'
local key = KEYS[1] .. 'budget:' .. ARGV[1]
if redis.call('EXISTS', key) == 0 then return 'NOT_FOUND' end
redis.call('HSET', key, 't', 0, 'c', 0, 'fired', ',', 'rs_at', ARGV[2], 'rs_by', ARGV[3])
redis.call('HINCRBY', key, 'gen', 1)
return 'OK'
