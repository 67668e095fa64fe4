-- Set (create or change) a thread's budget, keeping the hotness index and the count of
-- active (unclosed) budgets exact, the shard's and the project's. (Which project a thread belongs to is settled before,
-- in the thread directory.)
-- KEYS: 1 the project's partition prefix P, 2 the shard prefix S
-- ARGV: 1 max tokens, 2 now (ms), 3 thread id, 4 project id ('' for none),
--       5 may create a budget that does not exist yet (0/1)
-- Returns {'OK', 0, <budget state>} | {'NO_BUDGET', 0} when there is none and ARGV[5] is 0
local P, S = KEYS[1], KEYS[2]
local thread = P .. 'thread:' .. ARGV[3]
local existed = redis.call('HEXISTS', thread, 'max_tokens') == 1
if not existed and ARGV[5] ~= '1' then return {'NO_BUDGET', 0} end
purge_expired(P, ARGV[2])
redis.call('HSET', thread, 'max_tokens', ARGV[1], 'update_ms', ARGV[2], 'project_id', ARGV[4])
if not existed then
  redis.call('HINCRBY', S .. 'stats', 'active', 1)
  redis.call('INCR', P .. 'active')
end
local b = budget_state(thread)
local hot = b[2] > 0 and (b[3] + b[4]) / b[2] or 0
redis.call('ZADD', S .. 'budgets', hot, ARGV[3] .. '|' .. ARGV[4])
return with_state({'OK', 0}, thread)
