-- Record LLM calls: for each record, atomically, the idempotency check, settling its
-- reservation, the thread's counters and hotness, and the cluster, agent, model and
-- project aggregates. All keys of one call share the shard's hash tag (one slot).
--
-- KEYS, 12 per record: 1 usage-id key, 2 thread hash, 3 reservations hash,
--   4 reservation expiries, 5 budgets-by-hotness zset, 6 totals hash, 7 agent hash,
--   8 model hash, 9 agents-by-tokens zset, 10 models-by-tokens zset,
--   11 project totals hash, 12 project agents-by-tokens zset
-- ARGV: 1 now (ms), 2 usage-id ttl (s); then one per record, its fields joined by '|'
--   (ids cannot contain '|'): fingerprint, prompt, completion, cost micros, latency ms,
--   unpriced (0/1), reservation id, agent id, model, thread id, has project (0/1),
--   project id
-- Returns per record: {outcome, cost, <budget state>}, outcome NEW | DUPLICATE | CONFLICT,
-- or {'FOREIGN'} when the thread's budget belongs to another project (nothing written).
local K = 12
local now, ttl = ARGV[1], ARGV[2]
local replies = {}

local function split(text)
  local parts, start = {}, 1
  while true do
    local bar = string.find(text, '|', start, true)
    if not bar then
      parts[#parts + 1] = string.sub(text, start)
      return parts
    end
    parts[#parts + 1] = string.sub(text, start, bar - 1)
    start = bar + 1
  end
end

local function add(key, prompt, completion, cost, latency, unpriced)
  redis.call('HINCRBY', key, 'p', prompt)
  redis.call('HINCRBY', key, 'c', completion)
  redis.call('HINCRBY', key, 'n', 1)
  if cost ~= '0' then redis.call('HINCRBY', key, 'cost', cost) end
  if latency ~= '0' then redis.call('HINCRBY', key, 'lat', latency) end
  if unpriced ~= '0' then redis.call('HINCRBY', key, 'unp', 1) end
end

for i = 0, #KEYS / K - 1 do
  local k, r = i * K, split(ARGV[3 + i])
  local fp, prompt, completion, cost = r[1], r[2], r[3], r[4]
  local prior = redis.call('GET', KEYS[k + 1])
  if prior then
    local fields = split(prior)
    if fields[1] ~= fp then
      replies[#replies + 1] = {'CONFLICT'}
    else
      local reply = {'DUPLICATE'}
      for j = 2, #fields do reply[#reply + 1] = tonumber(fields[j]) end
      replies[#replies + 1] = reply
    end
  elseif r[11] == '1' and (redis.call('HGET', KEYS[k + 2], 'project_id') or r[12]) ~= r[12] then
    replies[#replies + 1] = {'FOREIGN'}
  else
    local thread = KEYS[k + 2]
    purge_expired(thread, KEYS[k + 3], KEYS[k + 4], now)
    local rid = r[7]
    if rid ~= '' then
      local held = redis.call('HGET', KEYS[k + 3], rid)
      if held then
        redis.call('HDEL', KEYS[k + 3], rid)
        redis.call('ZREM', KEYS[k + 4], rid)
        redis.call('HINCRBY', thread, 'reserved', -tonumber(held))
      end
    end
    local latency, unpriced = r[5], r[6]
    local tokens = tonumber(prompt) + tonumber(completion)
    add(thread, prompt, completion, cost, latency, unpriced)
    add(KEYS[k + 6], prompt, completion, cost, latency, unpriced)
    add(KEYS[k + 7], prompt, completion, cost, latency, unpriced)
    add(KEYS[k + 8], prompt, completion, cost, latency, unpriced)
    redis.call('ZINCRBY', KEYS[k + 9], tokens, r[8])
    redis.call('ZINCRBY', KEYS[k + 10], tokens, r[9])
    if r[11] == '1' then
      add(KEYS[k + 11], prompt, completion, cost, latency, unpriced)
      redis.call('ZINCRBY', KEYS[k + 12], tokens, r[8])
    end
    local state = budget_state(thread)
    if state[1] == 1 then
      redis.call('HSET', thread, 'update_ms', now)
      state[7] = tonumber(now)
      redis.call('ZADD', KEYS[k + 5], (state[3] + state[4]) / state[2], r[10])
    end
    local reply = {'NEW', tonumber(cost)}
    for _, v in ipairs(state) do reply[#reply + 1] = v end
    redis.call('SET', KEYS[k + 1], fp .. '|' .. table.concat(reply, '|', 2), 'EX', ttl)
    replies[#replies + 1] = reply
  end
end
return replies
