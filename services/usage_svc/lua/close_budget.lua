-- Close a thread's budget: no new reservations; it joins the shard's removal queue.
-- Idempotent.
-- KEYS: 1 the project's partition prefix P, 2 the shard prefix S
-- ARGV: 1 thread id, 2 now (ms)
-- Returns {outcome, 0, <budget state>}: OK | NO_BUDGET
local P, S = KEYS[1], KEYS[2]
local thread = P .. 'thread:' .. ARGV[1]
purge_expired(P, ARGV[2])
if redis.call('HEXISTS', thread, 'max_tokens') == 0 then return {'NO_BUDGET', 0} end
if redis.call('HGET', thread, 'closed') ~= '1' then
  redis.call('HSET', thread, 'closed', 1, 'update_ms', ARGV[2])
  redis.call('HINCRBY', S .. 'stats', 'active', -1)
  redis.call('DECR', P .. 'active')
  -- Removed with what else the thread left after THREAD_RETENTION (forget_thread.lua).
  local project = redis.call('HGET', thread, 'project_id') or ''
  redis.call('ZADD', S .. 'closed', ARGV[2], ARGV[1] .. '|' .. project)
end
return with_state({'OK', 0}, thread)
