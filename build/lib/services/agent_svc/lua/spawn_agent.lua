-- Spawn an agent atomically: idempotency key, project check, unique name, record,
-- indexes, counters and the status event, all or nothing.
-- KEYS: 1 agent hash, 2 project hash, 3 project's names hash, 4 request-id key,
--       5 project index, 6 project IDLE index, 7 all-agents index, 8 all IDLE index,
--       9 cluster counters, 10 project events stream, 11 all events stream
-- ARGV: 1 agent id, 2 name, 3 use request id (0/1), 4 request-id ttl seconds,
--       5 events max length, 6.. field/value pairs of the agent hash
-- Returns {'OK', id} | {'DUPLICATE', id} | {'NO_PROJECT'} | {'NAME_TAKEN', holder}
local id, name = ARGV[1], ARGV[2]
if ARGV[3] == '1' then
  local earlier = redis.call('GET', KEYS[4])
  if earlier then return {'DUPLICATE', earlier} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'NO_PROJECT'} end
local holder = redis.call('HGET', KEYS[3], name)
if holder then
  -- The same agent id means this very spawn was applied and is being replayed.
  if holder == id then return {'OK', id} end
  return {'NAME_TAKEN', holder}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('HSET', KEYS[3], name, id)
for i = 5, 8 do redis.call('ZADD', KEYS[i], 0, id) end
redis.call('HINCRBY', KEYS[2], 'n_total', 1)
redis.call('HINCRBY', KEYS[2], 'n_IDLE', 1)
redis.call('HINCRBY', KEYS[9], 'agents', 1)
redis.call('HINCRBY', KEYS[9], 'n_IDLE', 1)
if ARGV[3] == '1' then redis.call('SET', KEYS[4], id, 'EX', ARGV[4]) end
for i = 10, 11 do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[5], '*', 'agent_id', id, 'from', '', 'to', 'IDLE')
end
return {'OK', id}
