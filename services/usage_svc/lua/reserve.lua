-- Reserve tokens before an LLM call: accepted only when the thread's budget and every
-- HARD budget covering the call (its agent, model, API key and project) have room:
-- used + reserved + requested <= limit, in tokens and, for cost-limited budgets, in the
-- estimated cost. A retry with the same reservation id and tokens is answered again.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 reservation id, 2 thread id, 3 tokens, 4 cost estimate (micros), 5 now (ms),
--       6 expiry (ms), 7 agent id, 8 model, 9 API key id
-- Returns {outcome, expiry, <thread budget state>, refusing subjects...}:
--   OK | NO_BUDGET | CLOSED | EXHAUSTED | CONFLICT; or {'ROLL', P, budget id, ...} when a
--   covering budget's period has ended (nothing written; the caller opens it and retries)
local P = KEYS[1]
local rid, thread_id, tokens, cost = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now, expiry = ARGV[5], ARGV[6]
local thread = P .. 'thread:' .. thread_id
local field = thread_id .. '|' .. rid
local ids = covering(P, ARGV[7], ARGV[8], ARGV[9])
local stale = ended(P, ids, now, {})
if #stale > 0 then
  local reply = {'ROLL'}
  for _, item in ipairs(stale) do reply[#reply + 1] = item end
  return reply
end
purge_expired(P, now)
local b = budget_state(thread)
if b[1] == 0 then return {'NO_BUDGET', 0} end
local held = redis.call('HGET', P .. 'res', field)
if held then
  local r = split(held, '|')
  if tonumber(r[1]) ~= tokens then return with_state({'CONFLICT', 0}, thread) end
  return with_state({'OK', tonumber(r[3])}, thread)
end
if b[6] == 1 then return with_state({'CLOSED', 0}, thread) end
local refused = {}
if b[3] + b[4] + b[5] + tokens > b[2] then refused[#refused + 1] = 'thread:' .. thread_id end
for _, bid in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'budget:' .. bid, 'enf', 'lt', 'lc', 't', 'c', 'rt', 'rc')
  if f[1] == 'HARD' then
    local lt, lc = num(f[2]), num(f[3])
    if (lt > 0 and num(f[4]) + num(f[6]) + tokens > lt)
        or (lc > 0 and num(f[5]) + num(f[7]) + cost > lc) then
      refused[#refused + 1] = 'budget:' .. bid
    end
  end
end
if #refused > 0 then
  local reply = with_state({'EXHAUSTED', 0}, thread)
  for _, subject in ipairs(refused) do reply[#reply + 1] = subject end
  return reply
end
redis.call('HSET', P .. 'res', field, tokens .. '|' .. cost .. '|' .. expiry .. '|' .. table.concat(ids, ','))
redis.call('ZADD', P .. 'resexp', expiry, field)
redis.call('HINCRBY', thread, 'reserved', tokens)
redis.call('HSET', thread, 'update_ms', now)
for _, bid in ipairs(ids) do
  redis.call('HINCRBY', P .. 'budget:' .. bid, 'rt', tokens)
  if cost ~= 0 then redis.call('HINCRBY', P .. 'budget:' .. bid, 'rc', cost) end
end
return with_state({'OK', tonumber(expiry)}, thread)
