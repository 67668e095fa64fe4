-- After a retention pass over one project: score it in the due index by its earliest
-- queued item, or drop it when its queue was empty and no item was marked since the
-- pass read the project's mark count (a writer marks after queueing, so an item queued
-- while the pass looked changes the count and keeps the project).
-- KEYS: 1 the service's global prefix G
-- ARGV: 1 project, 2 mark count read before the queue, 3 earliest item's score ('' = empty)
-- Returns 1 when the project stays due, 0 when it was dropped.
local G, project = KEYS[1], ARGV[1]
if ARGV[3] ~= '' then
  redis.call('ZADD', G .. 'due', ARGV[3], project)
  return 1
end
if (redis.call('HGET', G .. 'marks', project) or '0') ~= ARGV[2] then return 1 end
redis.call('ZREM', G .. 'due', project)
redis.call('HDEL', G .. 'marks', project)
return 0
