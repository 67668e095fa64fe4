-- Log a model-gateway call that has no usage record (a call with one is logged by
-- record_usage.lua in the same step as its record).
-- KEYS: 1 the project's partition prefix P
-- ARGV: 1 the member ('<call ulid>|<ModelCall, base64>'), 2 the retention cutoff (a ULID
--       time prefix), 3 the most entries a project keeps
-- Returns 1.
log_call(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
