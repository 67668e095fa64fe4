-- Add, delete or re-key a webhook of a project.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 'ADD' | 'DEL' | 'ROTATE', 2 webhook id, 3 most webhooks per project; for ADD:
--       4 event types, then field/value pairs of its hash; for ROTATE: 4 the new secret,
--       5 until when (ms) the old one signs too (0: not at all)
-- Returns 'OK' | 'FULL' | 'NOT_FOUND'
local P, wid = KEYS[1], ARGV[2]
if ARGV[1] == 'ROTATE' then
  local hook = P .. 'webhook:' .. wid
  local old = redis.call('HGET', hook, 'secret')
  if not old then return 'NOT_FOUND' end
  redis.call('HSET', hook, 'secret', ARGV[4], 'prev_secret', old, 'prev_until', ARGV[5])
  return 'OK'
end
if ARGV[1] == 'DEL' then
  if redis.call('HDEL', P .. 'webhooks', wid) == 0 then return 'NOT_FOUND' end
  redis.call('DEL', P .. 'webhook:' .. wid)
  return 'OK'
end
if redis.call('HLEN', P .. 'webhooks') >= tonumber(ARGV[3]) then return 'FULL' end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', P .. 'webhook:' .. wid, unpack(fields))
redis.call('HSET', P .. 'webhooks', wid, ARGV[4])
return 'OK'
