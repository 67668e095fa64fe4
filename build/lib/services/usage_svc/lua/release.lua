-- Give a live reservation back early.
-- KEYS: 1 thread hash, 2 reservations hash, 3 reservation expiries
-- ARGV: 1 reservation id, 2 now (ms)
-- Returns {outcome, released (0/1), <budget state>}: OK | NO_BUDGET
local thread, res, exp = KEYS[1], KEYS[2], KEYS[3]
purge_expired(thread, res, exp, ARGV[2])
if redis.call('HEXISTS', thread, 'max_tokens') == 0 then return {'NO_BUDGET', 0} end
local held = redis.call('HGET', res, ARGV[1])
if not held then return with_state({'OK', 0}, thread) end
redis.call('HDEL', res, ARGV[1])
redis.call('ZREM', exp, ARGV[1])
redis.call('HINCRBY', thread, 'reserved', -tonumber(held))
redis.call('HSET', thread, 'update_ms', ARGV[2])
return with_state({'OK', 1}, thread)
