-- Give a live reservation back early, to its thread and to every budget it holds.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 reservation id, 2 thread id ('' for a reservation without one), 3 now (ms)
-- Returns {outcome, released (0/1), <thread budget state>}: OK | NO_BUDGET
local P, thread_id = KEYS[1], ARGV[2]
local thread = P .. 'thread:' .. thread_id
purge_expired(P, ARGV[3])
if thread_id ~= '' and redis.call('HEXISTS', thread, 'max_tokens') == 0 then
  return {'NO_BUDGET', 0}
end
local field = thread_id .. '|' .. ARGV[1]
local held = redis.call('HGET', P .. 'res', field)
if not held then return with_state({'OK', 0}, thread) end
give_back(P, field, held, ARGV[3])
if thread_id ~= '' then redis.call('HSET', thread, 'update_ms', ARGV[3]) end
return with_state({'OK', 1}, thread)
