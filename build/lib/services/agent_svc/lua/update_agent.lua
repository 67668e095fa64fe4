-- Change an agent atomically: existence and project check, lifecycle move (checked
-- against the allowed "from" states), rename with unique names, field changes, task
-- count, the indexes and counters of its status, and the status event.
-- KEYS: 1 agent hash, 2 project hash, 3 project's names hash, 4 cluster counters,
--       5 project events stream, 6 all events stream,
--       7..11 project status indexes, 12..16 all-agents status indexes
--       (in the order IDLE, WORKING, WAITING, PAUSED, TERMINATED)
-- ARGV: 1 project to check ('' for none), 2 target status ('' for no move),
--       3 allowed from-states ",A,B,", 4 new name ('' for none), 5 tasks completed +n,
--       6 now (ms), 7 events max length, 8 number of fields to delete,
--       9.. fields to delete, then field/value pairs to set
-- Returns {'OK', from} | {'NOT_FOUND'} | {'BAD_STATE', from} | {'NAME_TAKEN', holder}
local STATUSES = {IDLE = 0, WORKING = 1, WAITING = 2, PAUSED = 3, TERMINATED = 4}
local current = redis.call('HMGET', KEYS[1], 'status', 'project_id', 'name', 'id')
local from = current[1]
if not from then return {'NOT_FOUND'} end
if ARGV[1] ~= '' and current[2] ~= ARGV[1] then return {'NOT_FOUND'} end
local target = ARGV[2]
if target ~= '' then
  if not string.find(ARGV[3], ',' .. from .. ',', 1, true) then return {'BAD_STATE', from} end
elseif from == 'TERMINATED' then
  return {'BAD_STATE', from}
end
local id, old_name, new_name = current[4], current[3], ARGV[4]
if new_name ~= '' and new_name ~= old_name then
  local holder = redis.call('HGET', KEYS[3], new_name)
  if holder and holder ~= id then return {'NAME_TAKEN', holder} end
  redis.call('HDEL', KEYS[3], old_name)
  redis.call('HSET', KEYS[3], new_name, id)
  old_name = new_name
end
local n_delete = tonumber(ARGV[8])
if n_delete > 0 then redis.call('HDEL', KEYS[1], unpack(ARGV, 9, 8 + n_delete)) end
if #ARGV > 8 + n_delete then redis.call('HSET', KEYS[1], unpack(ARGV, 9 + n_delete)) end
local tasks = tonumber(ARGV[5])
if tasks > 0 then
  redis.call('HINCRBY', KEYS[1], 'tasks_completed', tasks)
  redis.call('HINCRBY', KEYS[2], 'tasks_completed', tasks)
  redis.call('HINCRBY', KEYS[4], 'tasks_completed', tasks)
end
if target ~= '' then
  redis.call('HSET', KEYS[1], 'status', target)
  redis.call('ZREM', KEYS[7 + STATUSES[from]], id)
  redis.call('ZREM', KEYS[12 + STATUSES[from]], id)
  redis.call('ZADD', KEYS[7 + STATUSES[target]], 0, id)
  redis.call('ZADD', KEYS[12 + STATUSES[target]], 0, id)
  for _, key in ipairs({KEYS[2], KEYS[4]}) do
    redis.call('HINCRBY', key, 'n_' .. from, -1)
    redis.call('HINCRBY', key, 'n_' .. target, 1)
  end
  if target == 'TERMINATED' and redis.call('HGET', KEYS[3], old_name) == id then
    redis.call('HDEL', KEYS[3], old_name)  -- a terminated agent frees its name
  end
  for i = 5, 6 do
    redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[7], '*', 'agent_id', id, 'from', from, 'to', target)
  end
end
redis.call('HSET', KEYS[1], 'last_activity_ms', ARGV[6], 'update_ms', ARGV[6])
return {'OK', from}
