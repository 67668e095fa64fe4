-- The global step of a write to one project's item (services/common/installation.py):
-- the installation-wide status indexes move to the item's state unless a newer change
-- of it was applied already; the write's intent is dropped; a project whose removal
-- queue just got an item is marked due.
-- KEYS: 1 the service's global prefix G
-- ARGV: 1 index member, 2 status ('' = the item is gone), 3 change number, 4 intent
--       ('' = none), 5 project now due ('' = none), 6 its item's time (ms),
--       7.. every status
-- Returns 1 when the indexes moved, 0 when a newer change was there already.
local G, member, status, seq = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
if ARGV[4] ~= '' then redis.call('ZREM', G .. 'intents', ARGV[4]) end
if ARGV[5] ~= '' then
  redis.call('ZADD', G .. 'due', 'LT', ARGV[6], ARGV[5])
  redis.call('HINCRBY', G .. 'marks', ARGV[5], 1)
end
if member == '' then return 0 end  -- a gone item whose member was never known
local seen = tonumber(redis.call('HGET', G .. 'seq', member) or '-1')
if seq < seen then return 0 end
for i = 7, #ARGV do redis.call('ZREM', G .. 'idx:' .. ARGV[i], member) end
if status == '' then
  redis.call('ZREM', G .. 'idx:', member)
  redis.call('HDEL', G .. 'seq', member)
else
  redis.call('ZADD', G .. 'idx:' .. status, 0, member)
  redis.call('ZADD', G .. 'idx:', 0, member)
  redis.call('HSET', G .. 'seq', member, seq)
end
return 1
