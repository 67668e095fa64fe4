-- Claim items whose time has come from a retention queue (a sorted set scored by the
-- time an item became removable), under a lease: a claimed item's score moves forward by
-- the lease, so no other replica takes it unless this one dies before removing it.
-- KEYS: 1 the queue
-- ARGV: 1 cutoff score (items scored at or below it are due), 2 lease (same unit), 3 limit
-- Returns the claimed members.
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
local until_score = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', until_score, member) end
return due
