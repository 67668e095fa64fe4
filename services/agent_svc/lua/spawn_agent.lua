-- Spawn an agent atomically: idempotency key, unique name, record, indexes, the
-- project's counters and the status event, all or nothing.
-- KEYS: 1 the project's prefix P
-- ARGV: 1 agent id, 2 name, 3 request id ('' for none), 4 request-id ttl seconds,
--       5 events max length, 6.. field/value pairs of the agent hash
-- Returns {'OK', id, created (0/1)} | {'DUPLICATE', id} | {'NAME_TAKEN', holder}
local P, id, name, req = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local request = P .. 'spawn:' .. req
if req ~= '' then
  local earlier = redis.call('GET', request)
  if earlier then return {'DUPLICATE', earlier} end
end
local holder = redis.call('HGET', P .. 'names', name)
if holder then
  -- The same agent id means this very spawn was applied and is being replayed.
  if holder == id then return {'OK', id, 0} end
  return {'NAME_TAKEN', holder}
end
local agent = P .. 'agent:' .. id
redis.call('HSET', agent, unpack(ARGV, 6))
redis.call('HSET', P .. 'names', name, id)
redis.call('ZADD', P .. 'idx:ALL', 0, id)
redis.call('ZADD', P .. 'idx:IDLE', 0, id)
redis.call('HINCRBY', P .. 'stats', 'n_total', 1)
redis.call('HINCRBY', P .. 'stats', 'n_IDLE', 1)
if req ~= '' then
  redis.call('SET', request, id, 'EX', ARGV[4])
  redis.call('HSET', agent, 'request', req)
end
redis.call('XADD', P .. 'events', 'MAXLEN', '~', ARGV[5], '*', 'agent_id', id, 'from', '', 'to', 'IDLE')
return {'OK', id, 1}
