-- End an ACTIVE thread (COMPLETED, FAILED or KILLED): status, end time, every index it
-- is in, a status entry in its log for watchers, and its place in the removal queue.
-- KEYS: 1 the project's prefix T
-- ARGV: 1 thread id, 2 target status, 3 now (ms), 4 reason
-- Returns {'OK', from, index member} | {'SAME', status} | {'NOT_ACTIVE', status} | {'NO_THREAD'}
local T, tid, target, now = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local thread = T .. 'thread:' .. tid
local status = redis.call('HGET', thread, 'status')
if not status then return {'NO_THREAD'} end
if status == target then return {'SAME', status} end
if status ~= 'ACTIVE' then return {'NOT_ACTIVE', status} end
local member = redis.call('HGET', thread, 'member')
redis.call('HSET', thread, 'status', target, 'end_ms', now, 'update_ms', now)
if ARGV[4] ~= '' then redis.call('HSET', thread, 'end_reason', ARGV[4]) end
local function move(prefix)
  redis.call('ZREM', prefix .. 'ACTIVE', member)
  redis.call('ZADD', prefix .. target, 0, member)
end
move(T .. 'idx:p:')
for _, agent in ipairs(redis.call('SMEMBERS', T .. 'parts:' .. tid)) do
  move(T .. 'idx:a:' .. agent .. ':')
end
redis.call('XADD', T .. 'log:' .. tid, '*', 'kind', 'status', 'status', target, 'ms', now)
redis.call('ZADD', T .. 'ended', now, tid)
return {'OK', status, member}
