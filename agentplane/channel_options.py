"""gRPC channel options every agentplane client uses — the SDK's channels and the
services' channels to each other alike: keep-alive pings every 30 s (an idle stream
through a proxy or load balancer stays open, and a dead peer is noticed within 10 s),
and replies up to 8 MiB. Hand-written; it sits beside the generated code because both
the SDK and the services' chassis build on it and neither may import the other."""

from __future__ import annotations

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]
