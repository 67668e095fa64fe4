-- Remove a terminated agent: its record, its index entries, its request id; the
-- project's counters forget it. Idempotent. The caller then deletes its directory entry
-- and last its queue entry.
-- KEYS: 1 the project's prefix P
-- ARGV: 1 agent id
-- Returns 'DONE' | 'ACTIVE' (not terminated: left alone, and out of the queue)
local P, id = KEYS[1], ARGV[1]
local agent = P .. 'agent:' .. id
local found = redis.call('HMGET', agent, 'status', 'request')
if found[1] and found[1] ~= 'TERMINATED' then
  redis.call('ZREM', P .. 'terminated', id)
  return 'ACTIVE'
end
if found[1] then
  redis.call('HINCRBY', P .. 'stats', 'n_TERMINATED', -1)
  redis.call('HINCRBY', P .. 'stats', 'n_total', -1)
  if found[2] then redis.call('DEL', P .. 'spawn:' .. found[2]) end
  redis.call('DEL', agent)
end
redis.call('ZREM', P .. 'idx:ALL', id)
redis.call('ZREM', P .. 'idx:TERMINATED', id)
return 'DONE'
