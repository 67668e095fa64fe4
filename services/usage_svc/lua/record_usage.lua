-- Record LLM calls: for each record, atomically, the idempotency check, settling its
-- reservation, the thread's counters and hotness, the shard's cluster/agent/model
-- aggregates, the project's aggregates, and every budget covering it: a calendar budget's
-- period (with its alerts), a window's bucket — the second its reservation was admitted
-- in, corrected to the actual usage, or this second for a record made without one.
--
-- KEYS, 2 per record: 1 the project's partition prefix P, 2 the shard prefix S
-- ARGV: 1 now (ms), 2 usage-id ttl (s), 3 hourly buckets kept (s), 4 daily buckets kept
--   (s), 5 the call log's cutoff (a ULID time prefix), 6 the most calls a project keeps;
--   then one per record, its fields joined by '|' (ids cannot contain '|'):
--   fingerprint, usage id, prompt, completion, cost micros, latency ms, unpriced (0/1),
--   reservation id, agent id ('' for none: usage from OpenTelemetry of an owner key
--   that named no agent), model, thread id ('' for none: it counts in every total but
--   no thread's), project id ('' for none), API key id,
--   cached prompt, reasoning, cache write, estimated (0/1), call ulid (a model-gateway
--   call's log entry: logged with a new record only; absent for none), call (the
--   ModelCall in base64), response id
-- Returns per record: {outcome, cost, <thread budget state>}, outcome NEW | DUPLICATE |
-- CONFLICT; or, before writing anything, {{'ROLL', P, budget id, ...}} when a covering
-- budget's period has ended (the caller opens the new period and calls again).
-- A call's response id (the provider's id of its answer, or '') is kept as P..'resp:'..id
-- for the usage-id ttl: OTLP ingestion skips the client spans that report it.
local now, ttl, keep_hour, keep_day = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local call_cutoff, call_most = ARGV[5], tonumber(ARGV[6])
local FIRST = 7
local hour = tonumber(now) - tonumber(now) % 3600000
local day = tonumber(now) - tonumber(now) % 86400000
local records = {}
local stale = {}
local covers = {}  -- the covering budgets, looked up once per (partition, agent, model, key)
for i = 0, #KEYS / 2 - 1 do
  local r = split(ARGV[FIRST + i], '|')
  local P, S = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local ids = {}
  if r[12] ~= '' then
    local who = P .. '|' .. r[9] .. '|' .. r[10] .. '|' .. r[13] .. '|' .. r[11]
    ids = covers[who]
    if not ids then
      ids = covering(P, r[9], r[10], r[13], r[11])
      covers[who] = ids
      ended(P, ids, now, stale)  -- (the same budgets need no second look)
    end
  end
  records[#records + 1] = {r = r, P = P, S = S, ids = ids}
end
if #stale > 0 then
  local reply = {'ROLL'}
  for _, item in ipairs(stale) do reply[#reply + 1] = item end
  return {reply}
end

local cached, reasoning, cache_write, estimated = '0', '0', '0', '0'  -- of the record being written
local now_sec = math.floor(tonumber(now) / 1000)

-- Each covering budget's window length (0: a calendar budget), read once per call; a
-- window is slid when first seen, so its buckets stay within it.
local windows = {}
local function window_of(P, bid)
  local key = P .. 'budget:' .. bid
  local win = windows[key]
  if win == nil then
    win = num(redis.call('HGET', key, 'win'))
    windows[key] = win
    if win > 0 then window_slide(P, bid, win, now_sec) end
  end
  return win
end

-- Aggregates (the threads' counters, the shard's and the project's totals, per agent,
-- per model, and the ranks): summed here per key and written once at the end, so a batch
-- pays a few commands per distinct key instead of a dozen per record. (A thread's budget
-- state, which each record's answer carries, is read once and kept current below.)
local sums, sums_order = {}, {}
local COUNTER_FIELDS = {'p', 'c', 'n', 'cost', 'lat', 'unp', 'cp', 'rs', 'cw', 'est'}
local N = #COUNTER_FIELDS

local function add_later(key, counters)
  local entry = sums[key]
  if not entry then
    entry = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
    sums[key] = entry
    sums_order[#sums_order + 1] = key
  end
  for j = 1, N do entry[j] = entry[j] + counters[j] end
end

local ranks, ranks_order = {}, {}

local function rank_later(key, member, by)
  local entry = ranks[key]
  if not entry then
    entry = {scores = {}, order = {}}
    ranks[key] = entry
    ranks_order[#ranks_order + 1] = key
  end
  if not entry.scores[member] then
    entry.scores[member] = 0
    entry.order[#entry.order + 1] = member
  end
  entry.scores[member] = entry.scores[member] + by
end

-- Covering budgets: a call's usage summed per budget, added once at the end, and its
-- alerts checked then (once per budget and call: a threshold the call's records reach
-- fires once, in this same atomic step).
local charges, charges_order = {}, {}

local function charge_later(P, S, project, bid, tokens, cost, requests)
  local key = P .. 'budget:' .. bid
  local entry = charges[key]
  if not entry then
    entry = {P = P, S = S, project = project, bid = bid, tokens = 0, cost = 0, requests = 0}
    charges[key] = entry
    charges_order[#charges_order + 1] = key
  end
  entry.tokens = entry.tokens + tokens
  entry.cost = entry.cost + cost
  entry.requests = entry.requests + requests
end

local function flush_charges()
  for _, key in ipairs(charges_order) do
    local e = charges[key]
    redis.call('HINCRBY', key, 't', string.format('%d', e.tokens))
    if e.cost ~= 0 then redis.call('HINCRBY', key, 'c', string.format('%d', e.cost)) end
    if e.requests ~= 0 then redis.call('HINCRBY', key, 'r', e.requests) end
    check_alerts(e.P, e.S, e.project, e.bid, now)
  end
end

-- Threads: each one's budget state read once per call and kept here as its records add
-- up (their counters wait in `sums`); its update time and hotness written once at the end.
local threads, hot, hot_order = {}, {}, {}

local function thread_state(thread)
  local state = threads[thread]
  if not state then
    state = budget_state(thread)
    threads[thread] = state
  end
  return state
end

local function flush_hot()
  for _, thread in ipairs(hot_order) do
    local h = hot[thread]
    redis.call('HSET', thread, 'update_ms', now)
    redis.call('ZADD', h.S .. 'budgets', h.score, h.member)
  end
end

local function flush_sums()
  for _, key in ipairs(sums_order) do
    local entry = sums[key]
    for j = 1, N do
      -- p, c and n are always written (as `add` does); the others only when not zero
      if j <= 3 or entry[j] ~= 0 then
        redis.call('HINCRBY', key, COUNTER_FIELDS[j], string.format('%d', entry[j]))
      end
    end
  end
  for _, key in ipairs(ranks_order) do
    local entry = ranks[key]
    for _, member in ipairs(entry.order) do
      redis.call('ZINCRBY', key, string.format('%d', entry.scores[member]), member)
    end
  end
end

-- Time-series buckets: the records of this call are summed here per (bucket, field) and
-- written once per bucket at the end (a batch of records in the same hour costs one
-- read and one write per bucket, not per record).
local pending, pending_order = {}, {}

local function pend(key, fields, counters, expire_at)
  local entry = pending[key]
  if not entry then
    entry = {fields = {}, order = {}, expire_at = expire_at}
    pending[key] = entry
    pending_order[#pending_order + 1] = key
  end
  for _, field in ipairs(fields) do
    local sums = entry.fields[field]
    if not sums then
      sums = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
      entry.fields[field] = sums
      entry.order[#entry.order + 1] = field
    end
    for j = 1, N do sums[j] = sums[j] + counters[j] end
  end
end

local function buckets(prefix, fields, counters)
  pend(prefix .. 'ts:h:' .. string.format('%d', hour), fields, counters,
    math.floor((hour / 1000) + keep_hour))
  pend(prefix .. 'ts:d:' .. string.format('%d', day), fields, counters,
    math.floor((day / 1000) + keep_day))
end

local function flush_buckets()
  for _, key in ipairs(pending_order) do
    local entry = pending[key]
    local current = redis.call('HMGET', key, 't', unpack(entry.order))
    local out = {}
    for i, field in ipairs(entry.order) do
      local v = entry.fields[field]
      if current[i + 1] then
        local parts = split(current[i + 1], ',')
        for j = 1, N do v[j] = v[j] + (tonumber(parts[j]) or 0) end
      end
      out[#out + 1] = field
      out[#out + 1] = string.format('%d,%d,%d,%d,%d,%d,%d,%d,%d,%d', unpack(v))
    end
    redis.call('HSET', key, unpack(out))
    if not current[1] then redis.call('EXPIREAT', key, entry.expire_at) end
  end
end

local replies = {}
local purged = {}
for _, item in ipairs(records) do
  local r, P, S = item.r, item.P, item.S
  local fp, prompt, completion, cost, latency, unpriced = r[1], r[3], r[4], r[5], r[6], r[7]
  local rid, agent, model, thread_id, project = r[8], r[9], r[10], r[11], r[12]
  cached, reasoning, cache_write, estimated = r[14] or '0', r[15] or '0', r[16] or '0', r[17] or '0'
  local usage_key = P .. 'usage:' .. thread_id .. ':' .. r[2]
  local prior = redis.call('GET', usage_key)
  if prior then
    local fields = split(prior, '|')
    if fields[1] ~= fp then
      replies[#replies + 1] = {'CONFLICT'}
    else
      local reply = {'DUPLICATE'}
      for j = 2, #fields do reply[#reply + 1] = tonumber(fields[j]) end
      replies[#replies + 1] = reply
    end
  else
    if not purged[P] then
      purge_expired(P, now)
      purged[P] = true
    end
    local thread = P .. 'thread:' .. thread_id
    local tokens = tonumber(prompt) + tonumber(completion)
    local settled = {}  -- the budgets whose reservation this record settles
    if rid ~= '' then
      local field = thread_id .. '|' .. rid
      local held = redis.call('HGET', P .. 'res', field)
      if held then
        for _, bid in ipairs(split(split(held, '|')[4] or '', ',')) do settled[bid] = true end
        give_back(P, field, held, now, {tokens, tonumber(cost)})
        if threads[thread] then  -- (its reserved tokens just changed)
          threads[thread][5] = num(redis.call('HGET', thread, 'reserved'))
        end
      end
    end
    local counters = {tonumber(prompt), tonumber(completion), 1, tonumber(cost),
      tonumber(latency), tonumber(unpriced), tonumber(cached), tonumber(reasoning),
      tonumber(cache_write), tonumber(estimated)}
    local state = thread_state(thread)
    if thread_id ~= '' then
      add_later(thread, counters)
      state[3], state[4] = state[3] + counters[1], state[4] + counters[2]
    end
    add_later(S .. 'totals', counters)
    add_later(S .. 'model:' .. model, counters)
    rank_later(S .. 'rank:models', model, tokens)
    local groups = {'t', 'm:' .. model}
    if agent ~= '' then  -- (a record without an agent counts in every total but no agent's)
      add_later(S .. 'agent:' .. agent, counters)
      rank_later(S .. 'rank:agents', agent, tokens)
      groups[3] = 'a:' .. agent
    end
    buckets(S, groups, counters)
    if project ~= '' then
      buckets(P, groups, counters)
      add_later(P .. 'totals', counters)
      if agent ~= '' then rank_later(P .. 'rank:agents', agent, tokens) end
      for _, bid in ipairs(item.ids) do
        local win = window_of(P, bid)
        if win == 0 then
          charge_later(P, S, project, bid, tokens, tonumber(cost), settled[bid] and 0 or 1)
        elseif not settled[bid] then
          window_add(P, bid, win, now_sec, now_sec, {tokens, 0, 1, tonumber(cost), 0})
        end
      end
    end
    if state[1] == 1 and thread_id ~= '' then
      state[7] = tonumber(now)
      if not hot[thread] then hot_order[#hot_order + 1] = thread end
      hot[thread] = {S = S, member = thread_id .. '|' .. project,
        score = state[2] > 0 and (state[3] + state[4]) / state[2] or 0}
    end
    local reply = {'NEW', tonumber(cost)}
    for _, v in ipairs(state) do reply[#reply + 1] = v end
    redis.call('SET', usage_key, fp .. '|' .. table.concat(reply, '|', 2), 'EX', ttl)
    if r[18] and r[18] ~= '' and project ~= '' then
      log_call(P, r[18] .. '|' .. r[19], call_cutoff, call_most)
      if r[20] and r[20] ~= '' then redis.call('SET', P .. 'resp:' .. r[20], r[18], 'EX', ttl) end
    end
    replies[#replies + 1] = reply
  end
end
flush_charges()
flush_sums()
flush_hot()
flush_buckets()
return replies
