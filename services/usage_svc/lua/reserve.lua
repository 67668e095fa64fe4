-- Reserve tokens before an LLM call: accepted only when the thread's budget (if the call
-- has a thread: a call without one is covered by its project's budgets alone) and every
-- HARD budget covering the call (its project, thread, agent, model and API key) have
-- room, all checked and taken in this one step: a calendar budget while used + reserved +
-- asked <= limit (tokens, estimated cost, and a request), a MINUTE or HOUR window while
-- what its last 60 (3,600) whole seconds admitted + asked <= limit, and `max_in_flight`
-- while fewer reservations than it are open. A refusal takes nothing. A retry with the
-- same reservation id and tokens is answered again.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 reservation id, 2 thread id ('' for none), 3 tokens, 4 cost estimate (micros),
--       5 now (ms), 6 expiry (ms), 7 agent id, 8 model, 9 API key id, 10 'CHARGE' to record
--       it in full when it expires unsettled ('' to give it back), 11 project id, 12 the
--       fewest tokens the caller accepts (0: exactly ARGV 3; else as many as the tightest
--       budget has room for, at most ARGV 3, at least this, the cost estimate scaled alike)
-- Returns {outcome, expiry, <thread budget state>, refusals... | tokens held (OK)}: OK |
--   NO_BUDGET | CLOSED |
--   EXHAUSTED (each refusal 'thread:<id>' or 'budget:<id>|<calendar|window|inflight>|<ms
--   until room, -1 never>') | CONFLICT; or {'ROLL', P, budget id, ...} when a covering
--   budget's period has ended (nothing written; the caller opens it and retries)
local P = KEYS[1]
local rid, thread_id, tokens, cost = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now, expiry = ARGV[5], ARGV[6]
local least = tonumber(ARGV[12] or '0') or 0
local sec = math.floor(tonumber(now) / 1000)
local thread = P .. 'thread:' .. thread_id
local field = thread_id .. '|' .. rid
local ids = covering(P, ARGV[7], ARGV[8], ARGV[9], thread_id)
local stale = ended(P, ids, now, {})
if #stale > 0 then
  local reply = {'ROLL'}
  for _, item in ipairs(stale) do reply[#reply + 1] = item end
  return reply
end
purge_expired(P, now)
local b = budget_state(thread)
if b[1] == 0 and thread_id ~= '' then return {'NO_BUDGET', 0} end
local held = redis.call('HGET', P .. 'res', field)
if held then
  local r = split(held, '|')
  local had = tonumber(r[1])
  if had ~= tokens and not (least > 0 and had >= least and had <= tokens) then
    return with_state({'CONFLICT', 0}, thread)
  end
  local reply = with_state({'OK', tonumber(r[3])}, thread)
  reply[#reply + 1] = had
  return reply
end
if b[6] == 1 then return with_state({'CLOSED', 0}, thread) end

-- Why budget `bid` (its fields f) refuses, or nil: (kind, ms until room or -1).
local function refusal(bid, f)
  local lt, lc, lr, mif, win = num(f[2]), num(f[3]), num(f[8]), num(f[9]), num(f[11])
  local kind, wait = nil, 0
  if win > 0 then
    local s = window_sums(P, bid)
    if (lt > 0 and s[1] + s[2] + tokens > lt) or (lr > 0 and s[3] + 1 > lr)
        or (lc > 0 and s[4] + s[5] + cost > lc) then
      kind, wait = 'window', window_wait(P, bid, win, now, lt, lr, lc, tokens, cost)
    end
  elseif (lt > 0 and num(f[4]) + num(f[6]) + tokens > lt)
      or (lc > 0 and num(f[5]) + num(f[7]) + cost > lc) or (lr > 0 and num(f[12]) + 1 > lr) then
    return 'calendar', -1
  end
  if mif > 0 and num(f[10]) + 1 > mif and (kind == nil or (wait >= 0 and wait < 1000)) then
    kind, wait = 'inflight', 1000
  end
  return kind, wait
end

local budgets = {}
for _, bid in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'budget:' .. bid,
    'enf', 'lt', 'lc', 't', 'c', 'rt', 'rc', 'lr', 'mif', 'inf', 'win', 'r')
  budgets[#budgets + 1] = {bid = bid, win = num(f[11]), f = f}
  if num(f[11]) > 0 then window_slide(P, bid, num(f[11]), sec) end
end

-- The room the tightest HARD budget has, in tokens (its cost limit converted at this
-- call's estimated price per token).
local function room()
  local least_room = tokens
  if b[1] == 1 then least_room = math.min(least_room, b[2] - b[3] - b[4] - b[5]) end
  for _, budget in ipairs(budgets) do
    local f = budget.f
    if f[1] == 'HARD' then
      local lt, lc = num(f[2]), num(f[3])
      local used_t, used_c = num(f[4]) + num(f[6]), num(f[5]) + num(f[7])
      if budget.win > 0 then
        local s = window_sums(P, budget.bid)
        used_t, used_c = s[1] + s[2], s[4] + s[5]
      end
      if lt > 0 then least_room = math.min(least_room, lt - used_t) end
      if lc > 0 and cost > 0 then
        least_room = math.min(least_room, math.floor((lc - used_c) * tokens / cost))
      end
    end
  end
  return least_room
end

if least > 0 and least < tokens then
  local grant = math.max(least, room())
  if grant < tokens then
    cost = math.ceil(cost * grant / tokens)
    tokens = grant
  end
end

local refused = {}
if b[1] == 1 and b[3] + b[4] + b[5] + tokens > b[2] then
  refused[#refused + 1] = 'thread:' .. thread_id
end
for _, budget in ipairs(budgets) do
  if budget.f[1] == 'HARD' then
    local kind, wait = refusal(budget.bid, budget.f)
    if kind then
      refused[#refused + 1] = 'budget:' .. budget.bid .. '|' .. kind .. '|' .. wait
    end
  end
end
if #refused > 0 then
  local reply = with_state({'EXHAUSTED', 0}, thread)
  for _, subject in ipairs(refused) do reply[#reply + 1] = subject end
  return reply
end
redis.call('HSET', P .. 'res', field, table.concat({tokens, cost, expiry, table.concat(ids, ','),
  sec, ARGV[10], ARGV[7], ARGV[8], ARGV[9], ARGV[11]}, '|'))
redis.call('ZADD', P .. 'resexp', expiry, field)
-- The shard's index of projects with holds, by the earliest expiry: a pass gives them
-- back (or charges them) at expiry even when nothing else touches the project.
redis.call('ZADD', string.match(P, '^(.-}:)') .. 'expiring', 'LT', expiry, ARGV[11])
if thread_id ~= '' then
  redis.call('HINCRBY', thread, 'reserved', tokens)
  redis.call('HSET', thread, 'update_ms', now)
end
for _, budget in ipairs(budgets) do
  local key = P .. 'budget:' .. budget.bid
  redis.call('HINCRBY', key, 'inf', 1)
  if budget.win > 0 then
    window_add(P, budget.bid, budget.win, sec, sec, {0, tokens, 1, 0, cost})
  else
    redis.call('HINCRBY', key, 'rt', tokens)
    if cost ~= 0 then redis.call('HINCRBY', key, 'rc', cost) end
    redis.call('HINCRBY', key, 'r', 1)
  end
end
local reply = with_state({'OK', tonumber(expiry)}, thread)
reply[#reply + 1] = tokens
return reply
