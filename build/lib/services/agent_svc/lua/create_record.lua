-- Create a record (project, agent type or API key) once, index it, and count it.
-- KEYS[1] record hash, KEYS[2] main index sorted set, KEYS[3] cluster counters hash,
-- KEYS[4..] further indexes (e.g. a project's owner index)
-- ARGV[1] index member, ARGV[2] counter field, ARGV[3..] field/value pairs
-- Returns 1 when created, 0 when the record already existed (nothing changed).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
for i = 2, #KEYS do
  if i ~= 3 then redis.call('ZADD', KEYS[i], 0, ARGV[1]) end
end
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
