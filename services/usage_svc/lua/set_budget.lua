-- Set (create or change) a thread's budget, keeping the hotness index and the count of
-- active (unclosed) budgets exact.
-- KEYS: 1 thread hash, 2 budgets-by-hotness zset, 3 shard stats hash,
--       4 reservations hash, 5 reservation expiries
-- ARGV: 1 max tokens, 2 now (ms), 3 thread id, 4 project id ('' for none),
--       5 may create a budget that does not exist yet (0/1)
-- Returns {'OK', 0, <budget state>} | {'FOREIGN', 0} when the budget belongs to another
-- project | {'NO_BUDGET', 0} when there is none and ARGV[5] is 0
local thread = KEYS[1]
local existed = redis.call('HEXISTS', thread, 'max_tokens') == 1
if not existed and ARGV[5] ~= '1' then return {'NO_BUDGET', 0} end
local owner = redis.call('HGET', thread, 'project_id')
if owner and ARGV[4] ~= '' and owner ~= ARGV[4] then return {'FOREIGN', 0} end
if not owner and ARGV[4] ~= '' then redis.call('HSET', thread, 'project_id', ARGV[4]) end
purge_expired(thread, KEYS[4], KEYS[5], ARGV[2])
redis.call('HSET', thread, 'max_tokens', ARGV[1], 'update_ms', ARGV[2])
if not existed then redis.call('HINCRBY', KEYS[3], 'active', 1) end
local b = budget_state(thread)
redis.call('ZADD', KEYS[2], (b[3] + b[4]) / b[2], ARGV[3])
return with_state({'OK', 0}, thread)
