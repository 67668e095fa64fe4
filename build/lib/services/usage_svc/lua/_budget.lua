-- Prelude shared by the usage scripts (prepended to each when it is loaded).
--
-- A thread's hash holds its usage counters (p prompt, c completion, n requests, cost
-- micro-USD, lat latency sum ms, unp unpriced requests) and, once it has a budget,
-- max_tokens, reserved, closed and update_ms. Live reservations are a hash
-- (reservation id -> tokens) and a sorted set (reservation id -> expiry ms).

-- Give back the tokens of reservations whose ttl has passed.
local function purge_expired(thread_key, res_key, exp_key, now)
  local expired = redis.call('ZRANGEBYSCORE', exp_key, '-inf', now, 'LIMIT', 0, 1000)
  if #expired == 0 then return end
  local freed = 0
  for _, rid in ipairs(expired) do
    freed = freed + tonumber(redis.call('HGET', res_key, rid) or 0)
  end
  redis.call('HDEL', res_key, unpack(expired))
  redis.call('ZREM', exp_key, unpack(expired))
  if freed > 0 then redis.call('HINCRBY', thread_key, 'reserved', -freed) end
end

-- The budget as a flat list: has_budget, max, prompt, completion, reserved, closed, update_ms.
local function budget_state(thread_key)
  local s = redis.call('HMGET', thread_key, 'max_tokens', 'p', 'c', 'reserved', 'closed', 'update_ms')
  return {s[1] and 1 or 0, tonumber(s[1] or 0), tonumber(s[2] or 0), tonumber(s[3] or 0),
          tonumber(s[4] or 0), tonumber(s[5] or 0), tonumber(s[6] or 0)}
end

local function with_state(head, thread_key)
  for _, v in ipairs(budget_state(thread_key)) do head[#head + 1] = v end
  return head
end
