-- Change an agent atomically: existence and project check, lifecycle move (checked
-- against the allowed "from" states), rename with unique names, field changes, task
-- count, the indexes and counters of its status, and the status event.
-- A terminated agent joins the project's removal queue. Each status move counts in the
-- record's `seq` (the installation-wide indexes apply moves in that order).
-- KEYS: 1 the project's prefix P
-- ARGV: 1 agent id, 2 project to check ('' for none), 3 target status ('' for no move),
--       4 allowed from-states ",A,B,", 5 new name ('' for none), 6 tasks completed +n,
--       7 now (ms), 8 events max length, 9 number of fields to delete,
--       10.. fields to delete, then field/value pairs to set
-- Returns {'OK', from, change number (status moves only)} | {'NOT_FOUND'} | {'BAD_STATE', from} | {'NAME_TAKEN', holder}
local P = KEYS[1]
local agent, names, stats = P .. 'agent:' .. ARGV[1], P .. 'names', P .. 'stats'
local current = redis.call('HMGET', agent, 'status', 'project_id', 'name', 'id')
local from = current[1]
if not from then return {'NOT_FOUND'} end
if ARGV[2] ~= '' and current[2] ~= ARGV[2] then return {'NOT_FOUND'} end
local target = ARGV[3]
if target ~= '' then
  if not string.find(ARGV[4], ',' .. from .. ',', 1, true) then return {'BAD_STATE', from} end
elseif from == 'TERMINATED' then
  return {'BAD_STATE', from}
end
local id, old_name, new_name = current[4], current[3], ARGV[5]
if new_name ~= '' and new_name ~= old_name then
  local holder = redis.call('HGET', names, new_name)
  if holder and holder ~= id then return {'NAME_TAKEN', holder} end
  redis.call('HDEL', names, old_name)
  redis.call('HSET', names, new_name, id)
  old_name = new_name
end
local n_delete = tonumber(ARGV[9])
if n_delete > 0 then redis.call('HDEL', agent, unpack(ARGV, 10, 9 + n_delete)) end
if #ARGV > 9 + n_delete then redis.call('HSET', agent, unpack(ARGV, 10 + n_delete)) end
local tasks = tonumber(ARGV[6])
if tasks > 0 then
  redis.call('HINCRBY', agent, 'tasks_completed', tasks)
  redis.call('HINCRBY', stats, 'tasks_completed', tasks)
end
if target ~= '' then
  redis.call('HSET', agent, 'status', target)
  redis.call('ZREM', P .. 'idx:' .. from, id)
  redis.call('ZADD', P .. 'idx:' .. target, 0, id)
  redis.call('HINCRBY', stats, 'n_' .. from, -1)
  redis.call('HINCRBY', stats, 'n_' .. target, 1)
  if target == 'TERMINATED' then
    if redis.call('HGET', names, old_name) == id then
      redis.call('HDEL', names, old_name)  -- a terminated agent frees its name
    end
    redis.call('ZADD', P .. 'terminated', ARGV[7], id)
  end
  redis.call('XADD', P .. 'events', 'MAXLEN', '~', ARGV[8], '*', 'agent_id', id, 'from', from, 'to', target)
end
redis.call('HSET', agent, 'last_activity_ms', ARGV[7], 'update_ms', ARGV[7])
if target ~= '' then return {'OK', from, redis.call('HINCRBY', agent, 'seq', 1)} end
return {'OK', from}
