-- End an ACTIVE thread (COMPLETED, FAILED or KILLED): status, end time, every index it
-- is in, and a status entry in its log for watchers.
-- KEYS: 1 thread hash, 2 participants set, 3 thread log, 4 project index ACTIVE,
--       5 project index <target>, 6 all-projects index ACTIVE, 7 all-projects index <target>,
--       then for each participant: its index ACTIVE, its index <target>
-- ARGV: 1 target status, 2 now (ms), 3 index member, 4 number of participants, 5 reason
-- Returns {'OK', from} | {'SAME', status} | {'NOT_ACTIVE', status} | {'NO_THREAD'} |
-- {'RETRY'} (a participant joined since the caller read them).
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'NO_THREAD'} end
if status == ARGV[1] then return {'SAME', status} end
if status ~= 'ACTIVE' then return {'NOT_ACTIVE', status} end
if redis.call('SCARD', KEYS[2]) ~= tonumber(ARGV[4]) then return {'RETRY'} end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'end_ms', ARGV[2], 'update_ms', ARGV[2])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'end_reason', ARGV[5]) end
for i = 4, #KEYS, 2 do
  redis.call('ZREM', KEYS[i], ARGV[3])
  redis.call('ZADD', KEYS[i + 1], 0, ARGV[3])
end
redis.call('XADD', KEYS[3], '*', 'kind', 'status', 'status', ARGV[1], 'ms', ARGV[2])
return {'OK', status}
