-- Post a message atomically: request-id check, the thread must be ACTIVE, the message
-- delivered into the recipient's inbox stream (unless the recipient is the operator, who
-- has no inbox: an agent's answer to an injected message) and appended to the thread's log (which
-- names the inbox entry and request id, so removal finds them), indexed for both agents,
-- both agents made participants; past the cap, the thread's oldest message is dropped.
-- KEYS: 1 the project's prefix T
-- ARGV: 1 request key ('' for none), 2 request-id ttl (s), 3 message id, 4 from, 5 to,
--       6 payload type, 7 payload (JSON), 8 now (ms), 9 thread id, 10 sender is an agent
--       (0/1), 11 most messages a thread keeps, 12 recipient is an agent (0/1)
-- Returns {'OK', ref} | {'DUPLICATE', ref} | {'NO_THREAD'} | {'NOT_ACTIVE', status},
-- where ref is "thread id|log entry id|message id".
local T, req, tid, from, to = KEYS[1], ARGV[1], ARGV[9], ARGV[4], ARGV[5]
local thread, parts, log = T .. 'thread:' .. tid, T .. 'parts:' .. tid, T .. 'log:' .. tid
if req ~= '' then
  local prior = redis.call('GET', T .. 'req:' .. req)
  if prior then return {'DUPLICATE', prior} end
end
local status = redis.call('HGET', thread, 'status')
if not status then return {'NO_THREAD'} end
if status ~= 'ACTIVE' then return {'NOT_ACTIVE', status} end
local thread_member = redis.call('HGET', thread, 'member')
local to_agent = ARGV[12] == '1'
local entry_fields = {'kind', 'message', 'id', ARGV[3], 'from', from, 'to', to,
  'type', ARGV[6], 'payload', ARGV[7], 'ms', ARGV[8]}
if to_agent then
  entry_fields[#entry_fields + 1] = 'inbox'
  entry_fields[#entry_fields + 1] = redis.call('XADD', T .. 'inbox:' .. to, '*',
    'thread_id', tid, 'id', ARGV[3], 'from', from, 'to', to, 'type', ARGV[6],
    'payload', ARGV[7], 'ms', ARGV[8])
end
if req ~= '' then
  entry_fields[#entry_fields + 1] = 'req'
  entry_fields[#entry_fields + 1] = req
end
local entry = redis.call('XADD', log, '*', unpack(entry_fields))
local count = redis.call('HINCRBY', thread, 'message_count', 1)
redis.call('HSET', thread, 'update_ms', ARGV[8])
local index_member = ARGV[3] .. '|' .. tid .. '|' .. entry
if to_agent then redis.call('ZADD', T .. 'msgs:' .. to, 0, index_member) end
if from ~= to and ARGV[10] == '1' then redis.call('ZADD', T .. 'msgs:' .. from, 0, index_member) end
local lm = log_member(entry)
if to_agent then redis.call('ZADD', T .. 'tmsgs:' .. tid .. ':' .. to, 0, lm) end
if from ~= to and ARGV[10] == '1' then redis.call('ZADD', T .. 'tmsgs:' .. tid .. ':' .. from, 0, lm) end
local function join(agent)
  if redis.call('SADD', parts, agent) == 1 then
    redis.call('ZADD', T .. 'idx:a:' .. agent .. ':ALL', 0, thread_member)
    redis.call('ZADD', T .. 'idx:a:' .. agent .. ':ACTIVE', 0, thread_member)
  end
end
if to_agent then join(to) end
if ARGV[10] == '1' then join(from) end
local dropped = tonumber(redis.call('HGET', thread, 'dropped') or '0')
if count - dropped > tonumber(ARGV[11]) then
  local oldest = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)[1]
  forget_message(T, tid, oldest[1], fields_of(oldest[2]))
  redis.call('XDEL', log, oldest[1])
  redis.call('HINCRBY', thread, 'dropped', 1)
end
local ref = tid .. '|' .. entry .. '|' .. ARGV[3]
if req ~= '' then redis.call('SET', T .. 'req:' .. req, ref, 'EX', ARGV[2]) end
return {'OK', ref}
