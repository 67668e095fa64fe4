-- Post a message atomically: request-id check, the thread must be ACTIVE, the message
-- appended to the thread's log, delivered into the recipient's inbox stream, indexed for
-- both agents, and both agents made participants.
-- KEYS: 1 thread hash, 2 participants set, 3 thread log, 4 request-id key,
--       5 recipient inbox, 6 recipient message index, 7 sender message index,
--       8 recipient thread index ALL, 9 recipient thread index ACTIVE,
--       10 sender thread index ALL, 11 sender thread index ACTIVE,
--       12 recipient's messages in this thread, 13 sender's messages in this thread
-- ARGV: 1 use request id (0/1), 2 request-id ttl (s), 3 message id, 4 from, 5 to,
--       6 payload type, 7 payload (JSON), 8 now (ms), 9 thread id, 10 sender is an agent (0/1)
-- Returns {'OK', ref} | {'DUPLICATE', ref} | {'NO_THREAD'} | {'NOT_ACTIVE', status},
-- where ref is "thread id|log entry id|message id".
if ARGV[1] == '1' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return {'DUPLICATE', prior} end
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'NO_THREAD'} end
if status ~= 'ACTIVE' then return {'NOT_ACTIVE', status} end
local thread_member = redis.call('HGET', KEYS[1], 'member')
local entry = redis.call('XADD', KEYS[3], '*', 'kind', 'message', 'id', ARGV[3],
  'from', ARGV[4], 'to', ARGV[5], 'type', ARGV[6], 'payload', ARGV[7], 'ms', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'message_count', 1)
redis.call('HSET', KEYS[1], 'update_ms', ARGV[8])
redis.call('XADD', KEYS[5], '*', 'thread_id', ARGV[9], 'entry', entry, 'id', ARGV[3],
  'from', ARGV[4], 'to', ARGV[5], 'type', ARGV[6], 'payload', ARGV[7], 'ms', ARGV[8])
local index_member = ARGV[3] .. '|' .. ARGV[9] .. '|' .. entry
redis.call('ZADD', KEYS[6], 0, index_member)
if ARGV[4] ~= ARGV[5] then redis.call('ZADD', KEYS[7], 0, index_member) end
-- Per agent within the thread, so a filtered listing pages exactly: the log entry id,
-- zero-padded so that text order is log order.
local ms, seq = string.match(entry, '(%d+)-(%d+)')
local log_member = string.rep('0', 15 - #ms) .. ms .. '-' .. string.rep('0', 10 - #seq) .. seq
redis.call('ZADD', KEYS[12], 0, log_member)
if ARGV[4] ~= ARGV[5] and ARGV[10] == '1' then redis.call('ZADD', KEYS[13], 0, log_member) end
if redis.call('SADD', KEYS[2], ARGV[5]) == 1 then
  redis.call('ZADD', KEYS[8], 0, thread_member)
  redis.call('ZADD', KEYS[9], 0, thread_member)
end
if ARGV[10] == '1' and redis.call('SADD', KEYS[2], ARGV[4]) == 1 then
  redis.call('ZADD', KEYS[10], 0, thread_member)
  redis.call('ZADD', KEYS[11], 0, thread_member)
end
local ref = ARGV[9] .. '|' .. entry .. '|' .. ARGV[3]
if ARGV[1] == '1' then redis.call('SET', KEYS[4], ref, 'EX', ARGV[2]) end
return {'OK', ref}
