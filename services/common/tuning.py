"""Tuning constants, in one place: how often, how long, how many. Not part of the
contract; change them here and nowhere else."""

from __future__ import annotations

# Server streams
STREAM_BLOCK_MS = 1000  # one blocking Redis read of a stream (inbox, thread log, agent events)
INBOX_LEASE_MS = 5000  # how long one inbox consumer's lease lasts without renewal
STATUS_CHECK_S = 1.0  # how often an open inbox re-reads its agent's status
AGENT_EVENTS_MAXLEN = 10_000  # agent status events kept per project (approximately)

# Peers and health
PEER_LOOKUP_TIMEOUT_S = 1.0  # usage figures in agent answers: a slow peer is left out
WHOAMI_TIMEOUT_S = 2.0  # asking the agent service who a token is
HEALTH_INTERVAL_S = 1.0  # how often a process checks its Redis for the health service

# Caches and batches
MAX_CACHED_ENTRIES = 50_000  # per-replica caches (tokens, visible projects) before a reset
MAX_GROUP_COMMIT = 256  # usage records per group-commit script call
TOP_N = 100  # agents and models listed in a usage overview

# Retention (SPEC §10)
RETENTION_LEASE_MS = 60_000  # a claimed item is taken again if not removed by then
RETENTION_CLAIM = 100  # items claimed (and removed concurrently) from one queue at a time
RETENTION_STEP = 500  # log entries removed per Lua call (bounded work inside Redis)
PROJECTS_CHUNK = 500  # projects read at a time by a retention pass
