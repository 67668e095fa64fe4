-- Acknowledge inbox deliveries and delete them from the inbox stream: an acknowledged
-- entry is done with (the thread's log keeps the message), so inboxes stay short.
-- KEYS: 1 the inbox stream
-- ARGV: ack ids
-- Returns how many were acknowledged (ids that were pending in the group).
local acked = 0
for i = 1, #ARGV do
  local ok = redis.pcall('XACK', KEYS[1], 'inbox', ARGV[i])
  if type(ok) == 'number' and ok == 1 then
    acked = acked + 1
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return acked
