-- Close a thread's budget: no new reservations. Idempotent.
-- KEYS: 1 thread hash, 2 shard stats hash, 3 reservations hash, 4 reservation expiries
-- ARGV: 1 now (ms)
-- Returns {outcome, 0, <budget state>}: OK | NO_BUDGET
local thread = KEYS[1]
purge_expired(thread, KEYS[3], KEYS[4], ARGV[1])
if redis.call('HEXISTS', thread, 'max_tokens') == 0 then return {'NO_BUDGET', 0} end
if redis.call('HGET', thread, 'closed') ~= '1' then
  redis.call('HSET', thread, 'closed', 1, 'update_ms', ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'active', -1)
end
return with_state({'OK', 0}, thread)
