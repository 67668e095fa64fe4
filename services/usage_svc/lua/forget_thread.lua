-- Remove a closed thread budget after THREAD_RETENTION: its hash (budget and per-thread
-- counters) and its hotness entry; expired reservations are given back first. The
-- per-call idempotency keys expire by themselves. Idempotent. The caller then deletes the
-- thread's directory entry, and last its queue entry.
-- KEYS: 1 the project's partition prefix P, 2 the shard prefix S
-- ARGV: 1 queue member "thread id|project id", 2 now (ms), 3 thread id
-- Returns 'DONE' | 'OPEN' (not closed: left alone, and out of the queue)
local P, S, member = KEYS[1], KEYS[2], ARGV[1]
local thread = P .. 'thread:' .. ARGV[3]
purge_expired(P, ARGV[2])
if redis.call('HEXISTS', thread, 'max_tokens') == 1 and redis.call('HGET', thread, 'closed') ~= '1' then
  redis.call('ZREM', S .. 'closed', member)
  return 'OPEN'
end
redis.call('DEL', thread)
redis.call('ZREM', S .. 'budgets', member)
return 'DONE'
