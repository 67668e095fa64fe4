-- Create a budget: its hash, the project's listings and the cover index records use.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 budget id, 2 scope, 3 scope id, 4 most budgets per project, 5 most budgets per
--       scope id, then field/value pairs of the budget hash
-- Returns 'OK' | 'FULL' (the project has the most budgets) | 'CROWDED' (the scope id has)
local P, bid, scope, sid = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local cover_field = scope .. '|' .. sid
if redis.call('ZCARD', P .. 'budgets') >= tonumber(ARGV[4]) then return 'FULL' end
local list = redis.call('HGET', P .. 'cover', cover_field) or ''
local count = 0
for _ in string.gmatch(list, '%S+') do count = count + 1 end
if count >= tonumber(ARGV[5]) then return 'CROWDED' end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', P .. 'budget:' .. bid, unpack(fields))
redis.call('ZADD', P .. 'budgets', 0, bid)
redis.call('ZADD', P .. 'budgets:' .. scope, 0, bid)
redis.call('HSET', P .. 'cover', cover_field, (list == '' and bid) or (list .. ' ' .. bid))
return 'OK'
