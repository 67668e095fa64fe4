-- Prelude shared by the usage scripts (prepended to each when it is loaded).
--
-- Every key of a script lives in one project's partition `P` (KEYS: the partition's
-- prefix, "ap:usage:{uN}:p:<project>:") or in its shard `S` ("ap:usage:{uN}:"); both carry
-- the shard's hash tag, so the keys a script derives from them are in the slot of the
-- key it declares (one slot per call, also on Redis Cluster).
--
-- P..'thread:<id>'   hash: usage counters (p prompt, c completion, n requests, cost
--                    micro-USD, lat latency sum, unp unpriced) and, with a budget,
--                    max_tokens, reserved, closed, update_ms
-- P..'res'           hash '<thread>|<reservation>' -> 'tokens|cost|expiry|b1,b2..'
-- P..'resexp'        zset of the same fields by expiry (ms)
-- P..'cover'         hash '<SCOPE>|<scope id>' -> budget ids covering it (space-separated)
-- P..'budget:<id>'   hash: settings (scope sid lt lc period tz enf th name ct ut) and the
--                    current period (ps pe t c rt rc fired gen rs_at rs_by)
-- P..'alerts'        stream of alerts; P..'alert:<alert id>' -> its entry id
-- P..'webhooks'      hash webhook id -> event types it takes (space-separated, '*' all)
-- S..'due'           zset '<project>|<delivery id>' -> when its next attempt is due (ms)

local ALERT_KEEP_MS = 7 * 24 * 3600 * 1000
local ALERT_ID_TTL_S = 8 * 24 * 3600
local DELIVERY_KEEP = 1000

local function split(text, sep)
  local parts, start = {}, 1
  while true do
    local at = string.find(text, sep, start, true)
    if not at then
      parts[#parts + 1] = string.sub(text, start)
      return parts
    end
    parts[#parts + 1] = string.sub(text, start, at - 1)
    start = at + 1
  end
end

local function num(v) return tonumber(v or 0) or 0 end

-- The thread budget as a flat list: has_budget, max, prompt, completion, reserved, closed,
-- update_ms.
local function budget_state(thread_key)
  local s = redis.call('HMGET', thread_key, 'max_tokens', 'p', 'c', 'reserved', 'closed', 'update_ms')
  return {s[1] and 1 or 0, num(s[1]), num(s[2]), num(s[3]), num(s[4]), num(s[5]), num(s[6])}
end

local function with_state(head, thread_key)
  for _, v in ipairs(budget_state(thread_key)) do head[#head + 1] = v end
  return head
end

-- Give a reservation back to its thread and to every budget it holds (still existing).
local function give_back(P, field, entry)
  local thread = split(field, '|')[1]
  local r = split(entry, '|')
  local tokens, cost = num(r[1]), num(r[2])
  -- (never HINCRBY by -0: Lua prints it "-0", which Redis does not take as an integer)
  if tokens ~= 0 then redis.call('HINCRBY', P .. 'thread:' .. thread, 'reserved', -tokens) end
  if r[4] and r[4] ~= '' then
    for _, bid in ipairs(split(r[4], ',')) do
      local key = P .. 'budget:' .. bid
      if redis.call('EXISTS', key) == 1 then
        if tokens ~= 0 then redis.call('HINCRBY', key, 'rt', -tokens) end
        if cost ~= 0 then redis.call('HINCRBY', key, 'rc', -cost) end
      end
    end
  end
  redis.call('HDEL', P .. 'res', field)
  redis.call('ZREM', P .. 'resexp', field)
end

-- Give back the reservations of the project whose ttl has passed.
local function purge_expired(P, now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'resexp', '-inf', now, 'LIMIT', 0, 200)
  for _, field in ipairs(expired) do
    local entry = redis.call('HGET', P .. 'res', field)
    if entry then give_back(P, field, entry) else redis.call('ZREM', P .. 'resexp', field) end
  end
end

-- The ids of the budgets covering a call: the project's, the agent's, the model's and
-- the API key's.
local function covering(P, agent, model, key)
  local fields = {'PROJECT|'}
  if agent ~= '' then fields[#fields + 1] = 'AGENT|' .. agent end
  if model ~= '' then fields[#fields + 1] = 'MODEL|' .. model end
  if key ~= '' then fields[#fields + 1] = 'API_KEY|' .. key end
  local ids = {}
  for _, list in ipairs(redis.call('HMGET', P .. 'cover', unpack(fields))) do
    if list then
      for id in string.gmatch(list, '%S+') do ids[#ids + 1] = id end
    end
  end
  return ids
end

-- The budgets among `ids` whose current period has ended (a new one must be opened
-- first), appended to `into` as pairs: the partition prefix P, the budget id.
local function ended(P, ids, now, into)
  for _, bid in ipairs(ids) do
    local pe = num(redis.call('HGET', P .. 'budget:' .. bid, 'pe'))
    if pe > 0 and tonumber(now) >= pe then
      into[#into + 1] = P
      into[#into + 1] = bid
    end
  end
  return into
end

local function percent(t, c, lt, lc)
  local p = 0
  if lt > 0 then p = math.max(p, t * 100 / lt) end
  if lc > 0 then p = math.max(p, c * 100 / lc) end
  return p
end

-- Queue one delivery of an alert to every webhook of the project that takes it.
local function enqueue(P, S, project, alert_id, encoded, now)
  local hooks = redis.call('HGETALL', P .. 'webhooks')
  for i = 1, #hooks, 2 do
    local wid, types = hooks[i], ' ' .. hooks[i + 1] .. ' '
    if string.find(types, ' * ', 1, true) or string.find(types, ' budget.alert ', 1, true) then
      local did = alert_id .. '.' .. wid
      local key = P .. 'delivery:' .. did
      if redis.call('EXISTS', key) == 0 then
        redis.call('HSET', key, 'wid', wid, 'event', alert_id, 'type', 'budget.alert',
          'status', 'PENDING', 'attempts', 0, 'code', 0, 'error', '', 'next', now,
          'ct', now, 'ut', now, 'body', encoded)
        local list = P .. 'webhook:' .. wid .. ':deliveries'
        redis.call('ZADD', list, now, did)
        if redis.call('ZCARD', list) > DELIVERY_KEEP then
          for _, old in ipairs(redis.call('ZRANGE', list, 0, -DELIVERY_KEEP - 1)) do
            redis.call('DEL', P .. 'delivery:' .. old)
          end
          redis.call('ZREMRANGEBYRANK', list, 0, -DELIVERY_KEEP - 1)
        end
        redis.call('ZADD', S .. 'due', now, project .. '|' .. did)
      end
    end
  end
end

-- Raise every threshold of a budget its usage has reached and that has not fired in this
-- period yet: once each, in the same step as the usage that reached it.
local function check_alerts(P, S, project, bid, now)
  local key = P .. 'budget:' .. bid
  local f = redis.call('HMGET', key, 'lt', 'lc', 'th', 'fired', 'ps', 'gen', 'scope', 'sid', 't', 'c')
  local t, c = num(f[9]), num(f[10])
  local pct = percent(t, c, num(f[1]), num(f[2]))
  local fired = f[4] or ','
  local raised = false
  for th in string.gmatch(f[3] or '', '%d+') do
    if pct >= tonumber(th) and not string.find(fired, ',' .. th .. ',', 1, true) then
      fired = fired .. th .. ','
      raised = true
      local alert_id = bid .. '.' .. (f[5] or '0') .. '.' .. th
      if num(f[6]) > 0 then alert_id = alert_id .. '.r' .. f[6] end
      local shown = string.format('%.1f', math.floor(pct * 10 + 0.5) / 10)
      -- (the counters as Redis keeps them: Lua would print a large number as 1e+15)
      local encoded = table.concat({alert_id, bid, project, f[7], f[8] or '', th, shown,
        f[9] or '0', f[10] or '0', f[5] or '0', now}, '|')
      local entry = redis.call('XADD', P .. 'alerts', 'MINID', '~', tonumber(now) - ALERT_KEEP_MS,
        '*', 'a', encoded)
      redis.call('SET', P .. 'alert:' .. alert_id, entry, 'EX', ALERT_ID_TTL_S)
      enqueue(P, S, project, alert_id, encoded, now)
    end
  end
  if raised then redis.call('HSET', key, 'fired', fired) end
end
