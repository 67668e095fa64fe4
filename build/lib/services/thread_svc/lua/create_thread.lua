-- Create a thread once, with its participants and every index it belongs to.
-- KEYS: 1 thread hash, 2 participants set, 3 project index ALL, 4 project index ACTIVE,
--       5 all-projects index ALL, 6 all-projects index ACTIVE,
--       then for each participant: its index ALL, its index ACTIVE
-- ARGV: 1 index member, 2 number of participants n, 3..2+n participants,
--       then field/value pairs of the thread hash
-- Returns 1 when created, 0 when the thread already existed (nothing changed).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3 + n))
for i = 3, 6 do redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
for i = 1, n do
  redis.call('SADD', KEYS[2], ARGV[2 + i])
  redis.call('ZADD', KEYS[5 + 2 * i], 0, ARGV[1])
  redis.call('ZADD', KEYS[6 + 2 * i], 0, ARGV[1])
end
return 1
