-- Delete a budget, its history and its place in the listings and the cover index.
-- Reservations that held it give back only to what still exists.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 budget id
-- Returns 'OK' | 'NOT_FOUND'
local P, bid = KEYS[1], ARGV[1]
local key = P .. 'budget:' .. bid
local f = redis.call('HMGET', key, 'scope', 'sid')
if not f[1] then return 'NOT_FOUND' end
local cover_field = f[1] .. '|' .. (f[2] or '')
local kept = {}
for id in string.gmatch(redis.call('HGET', P .. 'cover', cover_field) or '', '%S+') do
  if id ~= bid then kept[#kept + 1] = id end
end
if #kept == 0 then
  redis.call('HDEL', P .. 'cover', cover_field)
else
  redis.call('HSET', P .. 'cover', cover_field, table.concat(kept, ' '))
end
redis.call('ZREM', P .. 'budgets', bid)
redis.call('ZREM', P .. 'budgets:' .. f[1], bid)
redis.call('DEL', key, key .. ':periods', P .. 'win:' .. bid, P .. 'winz:' .. bid)
return 'OK'
