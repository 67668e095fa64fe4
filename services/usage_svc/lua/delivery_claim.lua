-- Claim the due deliveries of a shard for one attempt each: the attempt is counted and
-- the delivery hidden for a lease, so no two replicas make the same attempt; a replica
-- that dies mid-attempt leaves it to be claimed again when the lease ends.
-- KEYS: 1 the shard prefix S
-- ARGV: 1 now (ms), 2 lease (ms), 3 most to claim, 4 the partition prefix before the
--       project id ("ap:usage:{uN}:p:")
-- Returns per claimed delivery: {member, attempt, webhook url, secret, event id, type,
-- body, created ms, previous secret ('' once its grace period is over)}; deliveries
-- whose webhook is gone are marked FAILED instead.
local S, now = KEYS[1], tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', S .. 'due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local claimed = {}
for _, member in ipairs(due) do
  local bar = string.find(member, '|', 1, true)
  local P = ARGV[4] .. string.sub(member, 1, bar - 1) .. ':'
  local key = P .. 'delivery:' .. string.sub(member, bar + 1)
  local d = redis.call('HMGET', key, 'wid', 'event', 'type', 'body', 'ct', 'status')
  local hook = d[1] and redis.call('HMGET', P .. 'webhook:' .. d[1], 'url', 'secret',
    'prev_secret', 'prev_until')
  if not d[1] or d[6] ~= 'PENDING' then
    redis.call('ZREM', S .. 'due', member)
  elseif not hook[1] then
    redis.call('HSET', key, 'status', 'FAILED', 'error', 'webhook deleted', 'ut', now, 'next', 0)
    redis.call('ZREM', S .. 'due', member)
  else
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', S .. 'due', now + tonumber(ARGV[2]), member)
    local previous = ''
    if hook[3] and tonumber(hook[4] or '0') > now then previous = hook[3] end
    claimed[#claimed + 1] = {member, attempt, hook[1], hook[2], d[2], d[3], d[4], d[5], previous}
  end
end
return claimed
