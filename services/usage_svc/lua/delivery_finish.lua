-- Record how an attempt ended: DELIVERED, FAILED (retries ran out) or PENDING again with
-- its next attempt time. An attempt whose lease was taken over (a later attempt was
-- claimed) changes nothing.
-- KEYS: 1 the shard prefix S
-- ARGV: 1 member ('<project>|<delivery id>'), 2 attempt, 3 status, 4 response code,
--       5 error, 6 now (ms), 7 next attempt (ms; 0 when none), 8 partition prefix before
--       the project id
-- Returns 1 when recorded, 0 when stale
local S, member = KEYS[1], ARGV[1]
local bar = string.find(member, '|', 1, true)
local key = ARGV[8] .. string.sub(member, 1, bar - 1) .. ':delivery:' .. string.sub(member, bar + 1)
if redis.call('HGET', key, 'attempts') ~= ARGV[2] then return 0 end
redis.call('HSET', key, 'status', ARGV[3], 'code', ARGV[4], 'error', ARGV[5], 'ut', ARGV[6], 'next', ARGV[7])
if ARGV[3] == 'PENDING' then
  redis.call('ZADD', S .. 'due', ARGV[7], member)
else
  redis.call('ZREM', S .. 'due', member)
end
return 1
