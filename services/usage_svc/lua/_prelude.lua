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
-- P..'res'           hash '<thread>|<reservation>' -> 'tokens|cost|expiry|b1,b2..|second|
--                    on expiry|agent|model|API key|project' (second: the one it was
--                    admitted in, where a window counts it; on expiry: 'CHARGE' or '')
-- S..'charge'        zset '<project>|<thread>|<reservation>' -> when it expired: holds to
--                    record in full (estimated), S..'charge:e' their entries
-- P..'resexp'        zset of the same fields by expiry (ms)
-- P..'cover'         hash '<SCOPE>|<scope id>' -> budget ids covering it (space-separated)
-- P..'budget:<id>'   hash: settings (scope sid lt lc lr mif win period tz enf th name ct
--                    ut), open reservations (inf), and the current period (ps pe t c r
--                    rt rc fired gen rs_at rs_by); `win` > 0 (60, 3600): a sliding window
-- P..'win:<id>'      a window's buckets: '<second>' -> 'used,held,requests,used cost,held
--                    cost', and their sums U H R UC HC
-- P..'winz:<id>'     zset of the seconds that have a bucket
-- P..'alerts'        stream of alerts; P..'alert:<alert id>' -> its entry id
-- P..'webhooks'      hash webhook id -> event types it takes (space-separated, '*' all)
-- P..'calls'         zset of the model gateway's call log (see log_call)
-- P..'resp:'<id>     a provider's answer id the model gateway metered -> its call ulid
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

-- Sliding windows ---------------------------------------------------------------------
local WIN_SUMS = {'U', 'H', 'R', 'UC', 'HC'}

-- Drop the buckets that have left the window ending at second `sec` (amortised: each
-- bucket is dropped once), taking them out of the sums.
local function window_slide(P, bid, win, sec)
  local z = P .. 'winz:' .. bid
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', sec - win)
  if #old == 0 then return end
  local h = P .. 'win:' .. bid
  local gone = {0, 0, 0, 0, 0}
  for _, b in ipairs(redis.call('HMGET', h, unpack(old))) do
    if b then
      local v = split(b, ',')
      for j = 1, 5 do gone[j] = gone[j] + num(v[j]) end
    end
  end
  redis.call('HDEL', h, unpack(old))
  redis.call('ZREMRANGEBYSCORE', z, '-inf', sec - win)
  for j = 1, 5 do
    if gone[j] ~= 0 then redis.call('HINCRBY', h, WIN_SUMS[j], -gone[j]) end
  end
end

-- A window's sums: used, held, requests, used cost, held cost.
local function window_sums(P, bid)
  local v = redis.call('HMGET', P .. 'win:' .. bid, 'U', 'H', 'R', 'UC', 'HC')
  return {num(v[1]), num(v[2]), num(v[3]), num(v[4]), num(v[5])}
end

-- Add `delta` (used, held, requests, used cost, held cost) to second `sec`'s bucket;
-- nothing when that second has already left the window. The keys expire a little after
-- the window has passed without a new bucket, so an idle budget holds none.
local function window_add(P, bid, win, sec, now_sec, delta)
  if sec <= now_sec - win then return end
  local h, z = P .. 'win:' .. bid, P .. 'winz:' .. bid
  local current = redis.call('HGET', h, tostring(sec))
  local v = {0, 0, 0, 0, 0}
  if current then
    local parts = split(current, ',')
    for j = 1, 5 do v[j] = num(parts[j]) end
  end
  for j = 1, 5 do
    if delta[j] ~= 0 then
      v[j] = v[j] + delta[j]
      redis.call('HINCRBY', h, WIN_SUMS[j], string.format('%d', delta[j]))
    end
  end
  redis.call('HSET', h, tostring(sec), string.format('%d,%d,%d,%d,%d', unpack(v)))
  if not current then  -- (a new second: at most one per second, so the expiry stays fresh)
    redis.call('ZADD', z, sec, sec)
    redis.call('EXPIRE', h, win + 5)
    redis.call('EXPIRE', z, win + 5)
  end
end

-- How long (ms) until the window has room for `need` (tokens, cost) and one request under
-- the limits lt, lr, lc: the time its oldest buckets take to leave it. -1: never (the
-- call alone is over a limit).
local function window_wait(P, bid, win, now_ms, lt, lr, lc, need, need_cost)
  if (lt > 0 and need > lt) or (lc > 0 and need_cost > lc) or (lr > 0 and 1 > lr) then
    return -1
  end
  local s = window_sums(P, bid)
  local over_t, over_r, over_c = s[1] + s[2] + need - lt, s[3] + 1 - lr, s[4] + s[5] + need_cost - lc
  local seconds = redis.call('ZRANGE', P .. 'winz:' .. bid, 0, -1)
  local buckets = #seconds > 0 and redis.call('HMGET', P .. 'win:' .. bid, unpack(seconds)) or {}
  for i, sec in ipairs(seconds) do
    if (lt <= 0 or over_t <= 0) and (lr <= 0 or over_r <= 0) and (lc <= 0 or over_c <= 0) then break end
    local v = split(buckets[i] or '0,0,0,0,0', ',')
    over_t, over_r, over_c = over_t - num(v[1]) - num(v[2]), over_r - num(v[3]), over_c - num(v[4]) - num(v[5])
    if (lt <= 0 or over_t <= 0) and (lr <= 0 or over_r <= 0) and (lc <= 0 or over_c <= 0) then
      return math.max(1, (tonumber(sec) + win) * 1000 - tonumber(now_ms))
    end
  end
  return 1000  -- (held reservations that a settle or release will free)
end

-- Give a reservation back to its thread and to every budget it holds (still existing):
-- its slot, and its tokens and cost — into a window's bucket of the second it was
-- admitted in as `actual` (tokens, cost) when it is settled, else out of it.
local function give_back(P, field, entry, now, actual)
  local thread = split(field, '|')[1]
  local r = split(entry, '|')
  local tokens, cost, admitted = num(r[1]), num(r[2]), num(r[5])
  local now_sec = math.floor(tonumber(now) / 1000)
  -- (never HINCRBY by -0: Lua prints it "-0", which Redis does not take as an integer)
  if tokens ~= 0 and thread ~= '' then
    redis.call('HINCRBY', P .. 'thread:' .. thread, 'reserved', -tokens)
  end
  if r[4] and r[4] ~= '' then
    for _, bid in ipairs(split(r[4], ',')) do
      local key = P .. 'budget:' .. bid
      local f = redis.call('HMGET', key, 'win', 'inf', 'scope')
      if f[3] then
        if num(f[2]) > 0 then redis.call('HINCRBY', key, 'inf', -1) end
        local win = num(f[1])
        if win > 0 then
          local used, used_cost = 0, 0
          if actual then used, used_cost = actual[1], actual[2] end
          window_add(P, bid, win, admitted, now_sec, {used, -tokens, 0, used_cost, -cost})
        else
          if tokens ~= 0 then redis.call('HINCRBY', key, 'rt', -tokens) end
          if cost ~= 0 then redis.call('HINCRBY', key, 'rc', -cost) end
        end
      end
    end
  end
  redis.call('HDEL', P .. 'res', field)
  redis.call('ZREM', P .. 'resexp', field)
end

-- Give back the reservations of the project whose ttl has passed; one made to be charged
-- on expiry is queued in its shard for the service to record in full (estimated).
local function purge_expired(P, now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'resexp', '-inf', now, 'LIMIT', 0, 200)
  for _, field in ipairs(expired) do
    local entry = redis.call('HGET', P .. 'res', field)
    if entry then
      local r = split(entry, '|')
      if r[6] == 'CHARGE' then
        local S = string.match(P, '^(.-}:)')  -- the shard's prefix: the same hash tag
        local member = (r[10] or '') .. '|' .. field
        redis.call('ZADD', S .. 'charge', now, member)
        redis.call('HSET', S .. 'charge:e', member, entry)
      end
      give_back(P, field, entry, now)
    else
      redis.call('ZREM', P .. 'resexp', field)
    end
  end
end

-- The ids of the budgets covering a call: the project's, the thread's, the agent's, the
-- model's and the API key's.
local function covering(P, agent, model, key, thread)
  local fields = {'PROJECT|'}
  if thread and thread ~= '' then fields[#fields + 1] = 'THREAD|' .. thread end
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

-- The model gateway's call log of a project: one sorted set, members '<call ulid>|<the
-- ModelCall, base64>' at score 0, so lexical order is time order; entries older than
-- `cutoff` (a ULID's time prefix) and past the newest `most` are dropped as calls arrive.
local function log_call(P, member, cutoff, most)
  local key = P .. 'calls'
  redis.call('ZADD', key, 0, member)
  redis.call('ZREMRANGEBYLEX', key, '-', '(' .. cutoff)
  local n = redis.call('ZCARD', key)
  if n > most then redis.call('ZREMRANGEBYRANK', key, 0, n - most - 1) end
end
