-- Give back (or queue to be charged) a project's reservations whose ttl has passed, and
-- keep the shard's index of projects with holds up to date: the project stays there,
-- scored by its next expiry, or leaves when it holds nothing.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 now (ms), 2 project id
-- Returns the number of holds left.
local P = KEYS[1]
purge_expired(P, ARGV[1])
local S = string.match(P, '^(.-}:)')
local next_one = redis.call('ZRANGE', P .. 'resexp', 0, 0, 'WITHSCORES')
if #next_one == 0 then
  redis.call('ZREM', S .. 'expiring', ARGV[2])
  return 0
end
redis.call('ZADD', S .. 'expiring', next_one[2], ARGV[2])
return redis.call('ZCARD', P .. 'resexp')
