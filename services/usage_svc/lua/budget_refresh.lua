-- Bring budgets to the present: give back lapsed reservations, and open the current
-- period of each budget whose period has ended (its final usage goes to its history).
-- Idempotent: replicas that compute the same period at once open it once.
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 now (ms), then per budget: id, current period start, its end, history kept
-- Returns each budget's hash after (flat field/value lists; empty when it does not exist),
-- a window's sums over its last 60 (3,600) seconds added as wU wH wR wUC wHC.
local P = KEYS[1]
purge_expired(P, ARGV[1])
local hashes = {}
for i = 2, #ARGV, 4 do
  local key = P .. 'budget:' .. ARGV[i]
  local f = redis.call('HMGET', key, 'ps', 'pe', 't', 'c', 'lt', 'lc')
  if f[1] and tonumber(f[1]) < tonumber(ARGV[i + 1]) then
    local keep = tonumber(ARGV[i + 3])
    if keep > 0 then
      local entry = {f[1], f[2] or '0', f[3] or '0', f[4] or '0', f[5] or '0', f[6] or '0'}
      redis.call('LPUSH', key .. ':periods', table.concat(entry, '|'))
      redis.call('LTRIM', key .. ':periods', 0, keep - 1)
    end
    redis.call('HSET', key, 'ps', ARGV[i + 1], 'pe', ARGV[i + 2], 't', 0, 'c', 0, 'fired', ',', 'gen', 0)
  end
  local hash = redis.call('HGETALL', key)
  local win = num(redis.call('HGET', key, 'win'))
  if win > 0 then
    window_slide(P, ARGV[i], win, math.floor(tonumber(ARGV[1]) / 1000))
    local s = window_sums(P, ARGV[i])
    for j, name in ipairs({'wU', 'wH', 'wR', 'wUC', 'wHC'}) do
      hash[#hash + 1] = name
      hash[#hash + 1] = s[j]
    end
  end
  hashes[#hashes + 1] = hash
end
return hashes
