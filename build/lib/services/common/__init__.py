"""The chassis every agentplane service shares: settings, logging, telemetry, Redis,
server bootstrap, errors, request context and peer clients."""
