-- Read a thread's budget after giving back expired reservations.
-- KEYS: 1 thread hash, 2 reservations hash, 3 reservation expiries
-- ARGV: 1 now (ms)
-- Returns {outcome, 0, <budget state>}: OK | NO_BUDGET
purge_expired(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'max_tokens') == 0 then return {'NO_BUDGET', 0} end
return with_state({'OK', 0}, KEYS[1])
