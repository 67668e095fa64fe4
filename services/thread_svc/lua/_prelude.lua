-- Shared by the thread service's scripts. Every key of a project starts with its prefix
-- T (one hash tag), so scripts derive the keys they touch from it.

local function fields_of(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end

-- A log entry id zero-padded so that text order is log order (per-agent-in-thread index).
local function log_member(entry)
  local ms, seq = string.match(entry, '(%d+)-(%d+)')
  return string.rep('0', 15 - #ms) .. ms .. '-' .. string.rep('0', 10 - #seq) .. seq
end

-- Everything outside the thread's own keys that one message left: its members in the
-- agents' message indexes, its inbox entry (acknowledged and deleted), its request id.
local function forget_message(T, tid, entry, f)
  local member = f.id .. '|' .. tid .. '|' .. entry
  redis.call('ZREM', T .. 'msgs:' .. f.to, member)
  redis.call('ZREM', T .. 'msgs:' .. f.from, member)
  local lm = log_member(entry)
  redis.call('ZREM', T .. 'tmsgs:' .. tid .. ':' .. f.to, lm)
  redis.call('ZREM', T .. 'tmsgs:' .. tid .. ':' .. f.from, lm)
  if f.inbox then
    local inbox = T .. 'inbox:' .. f.to
    redis.pcall('XACK', inbox, 'inbox', f.inbox)  -- the group may be gone with the inbox
    redis.call('XDEL', inbox, f.inbox)
  end
  if f.req then redis.call('DEL', T .. 'req:' .. f.req) end
end
