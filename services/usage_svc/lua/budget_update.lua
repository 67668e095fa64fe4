-- Change a budget's settings; thresholds its usage has now reached fire at once.
-- KEYS: 1 the project's partition prefix P, 2 the shard prefix S
-- ARGV: 1 budget id, 2 project id, 3 now (ms), then field/value pairs to set
-- Returns 'OK' | 'NOT_FOUND'
local P, S, bid = KEYS[1], KEYS[2], ARGV[1]
local key = P .. 'budget:' .. bid
if redis.call('EXISTS', key) == 0 then return 'NOT_FOUND' end
local fields = {'ut', ARGV[3]}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
check_alerts(P, S, ARGV[2], bid, ARGV[3])
return 'OK'
