-- Create a record (project or agent type) once, index it, and count it.
-- KEYS[1] record hash, KEYS[2] index sorted set, KEYS[3] cluster counters hash
-- ARGV[1] index member, ARGV[2] counter field, ARGV[3..] field/value pairs
-- Returns 1 when created, 0 when the record already existed (nothing changed).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
