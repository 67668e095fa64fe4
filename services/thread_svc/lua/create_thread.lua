-- Create a thread once, with its participants and every index it belongs to.
-- KEYS: 1 the project's prefix T
-- ARGV: 1 thread id, 2 index member, 3 number of participants n, 4..3+n participants,
--       then field/value pairs of the thread hash
-- Returns 1 when created, 0 when the thread already existed (nothing changed).
local T, tid, member = KEYS[1], ARGV[1], ARGV[2]
local thread = T .. 'thread:' .. tid
if redis.call('EXISTS', thread) == 1 then return 0 end
local n = tonumber(ARGV[3])
redis.call('HSET', thread, unpack(ARGV, 4 + n))
redis.call('ZADD', T .. 'idx:p:ALL', 0, member)
redis.call('ZADD', T .. 'idx:p:ACTIVE', 0, member)
for i = 1, n do
  local agent = ARGV[3 + i]
  redis.call('SADD', T .. 'parts:' .. tid, agent)
  redis.call('ZADD', T .. 'idx:a:' .. agent .. ':ALL', 0, member)
  redis.call('ZADD', T .. 'idx:a:' .. agent .. ':ACTIVE', 0, member)
end
return 1
