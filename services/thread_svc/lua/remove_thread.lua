-- Remove an ended thread, one bounded step at a time (idempotent: a step that is cut
-- short is simply done again). While its log has entries, each call removes up to
-- `step` of them with what each message left elsewhere; the call that finds the log
-- empty removes the thread's record, participants and indexes. The caller then deletes
-- its directory entry, and last its queue entry (so a remover that dies in between
-- leaves the item queued, and the next one finishes it).
-- KEYS: 1 the project's prefix T
-- ARGV: 1 thread id, 2 step (entries per call)
-- Returns 'MORE' | 'DONE' | 'ACTIVE' (not ended: left alone, and out of the queue)
local T, tid = KEYS[1], ARGV[1]
local thread, log = T .. 'thread:' .. tid, T .. 'log:' .. tid
local status = redis.call('HGET', thread, 'status')
if status == 'ACTIVE' then
  redis.call('ZREM', T .. 'ended', tid)
  return 'ACTIVE'
end
local entries = redis.call('XRANGE', log, '-', '+', 'COUNT', ARGV[2])
for _, e in ipairs(entries) do
  local f = fields_of(e[2])
  if f.kind == 'message' then forget_message(T, tid, e[1], f) end
  redis.call('XDEL', log, e[1])
end
if #entries > 0 then return 'MORE' end
local member = redis.call('HGET', thread, 'member')
local parts = T .. 'parts:' .. tid
if member then
  redis.call('ZREM', T .. 'idx:p:ALL', member)
  redis.call('ZREM', T .. 'idx:p:' .. status, member)
end
for _, agent in ipairs(redis.call('SMEMBERS', parts)) do
  if member then
    redis.call('ZREM', T .. 'idx:a:' .. agent .. ':ALL', member)
    redis.call('ZREM', T .. 'idx:a:' .. agent .. ':' .. status, member)
  end
  redis.call('DEL', T .. 'tmsgs:' .. tid .. ':' .. agent)
  -- An agent left with no thread has nothing in its inbox: drop the empty stream and
  -- its group too (a receiver recreates them).
  local inbox = T .. 'inbox:' .. agent
  if redis.call('EXISTS', T .. 'idx:a:' .. agent .. ':ALL') == 0
      and redis.call('XLEN', inbox) == 0 then
    redis.call('DEL', inbox)
  end
end
redis.call('DEL', thread, parts, log)
return 'DONE'
