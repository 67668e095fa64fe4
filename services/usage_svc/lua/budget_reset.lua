-- Reset a budget's current period to zero and re-arm its alert thresholds; a window
-- forgets what it admitted (the reservations still open stay held in it).
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 budget id, 2 now (ms), 3 who
-- Returns 'OK' | 'NOT_FOUND'
local P, bid = KEYS[1], ARGV[1]
local key = P .. 'budget:' .. bid
if redis.call('EXISTS', key) == 0 then return 'NOT_FOUND' end
redis.call('HSET', key, 't', 0, 'c', 0, 'r', 0, 'fired', ',', 'rs_at', ARGV[2], 'rs_by', ARGV[3])
redis.call('HINCRBY', key, 'gen', 1)
local h = P .. 'win:' .. bid
local seconds = redis.call('ZRANGE', P .. 'winz:' .. bid, 0, -1)
if #seconds > 0 then
  local buckets = redis.call('HMGET', h, unpack(seconds))
  for i, sec in ipairs(seconds) do
    local v = split(buckets[i] or '0,0,0,0,0', ',')
    redis.call('HSET', h, sec, string.format('0,%d,0,0,%d', num(v[2]), num(v[5])))
  end
  redis.call('HSET', h, 'U', 0, 'R', 0, 'UC', 0)
end
return 'OK'
