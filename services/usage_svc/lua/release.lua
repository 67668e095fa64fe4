-- Give a live reservation back early, to its thread and to every budget it holds.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 reservation id, 2 thread id, 3 now (ms)
-- Returns {outcome, released (0/1), <thread budget state>}: OK | NO_BUDGET
local P = KEYS[1]
local thread = P .. 'thread:' .. ARGV[2]
purge_expired(P, ARGV[3])
if redis.call('HEXISTS', thread, 'max_tokens') == 0 then return {'NO_BUDGET', 0} end
local field = ARGV[2] .. '|' .. ARGV[1]
local held = redis.call('HGET', P .. 'res', field)
if not held then return with_state({'OK', 0}, thread) end
give_back(P, field, held, ARGV[3])
redis.call('HSET', thread, 'update_ms', ARGV[3])
return with_state({'OK', 1}, thread)
