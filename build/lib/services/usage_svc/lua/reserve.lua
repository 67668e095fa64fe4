-- Reserve tokens of a thread's budget: accepted only while used + reserved + requested
-- <= max_tokens. A retry with the same reservation id and tokens is answered again.
-- KEYS: 1 thread hash, 2 reservations hash, 3 reservation expiries
-- ARGV: 1 reservation id, 2 tokens, 3 now (ms), 4 expiry (ms)
-- Returns {outcome, expiry, <budget state>}: OK | NO_BUDGET | CLOSED | EXHAUSTED | CONFLICT
local thread, res, exp = KEYS[1], KEYS[2], KEYS[3]
local rid, tokens = ARGV[1], tonumber(ARGV[2])
purge_expired(thread, res, exp, ARGV[3])
local b = budget_state(thread)
if b[1] == 0 then return {'NO_BUDGET', 0} end
local held = redis.call('HGET', res, rid)
if held then
  if tonumber(held) ~= tokens then return with_state({'CONFLICT', 0}, thread) end
  return with_state({'OK', tonumber(redis.call('ZSCORE', exp, rid))}, thread)
end
if b[6] == 1 then return with_state({'CLOSED', 0}, thread) end
if b[3] + b[4] + b[5] + tokens > b[2] then return with_state({'EXHAUSTED', 0}, thread) end
redis.call('HSET', res, rid, tokens)
redis.call('ZADD', exp, ARGV[4], rid)
redis.call('HINCRBY', thread, 'reserved', tokens)
redis.call('HSET', thread, 'update_ms', ARGV[3])
return with_state({'OK', tonumber(ARGV[4])}, thread)
