"""Default rate limits: a method's burst is its per-minute count (the seed's "20/minute"
admits 20 spawns at once; the 21st waits)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis

from services.common import errors
from services.common.auth import OWNER, Principal, RateLimiter
from services.common.rates import parse_rate_limits


@pytest.mark.parametrize(("method", "per_minute"), [("SpawnAgent", 20), ("CreateProject", 30)])
async def test_a_burst_of_a_minutes_worth_is_admitted_and_no_more(redis_url, method, per_minute):
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        limiter = RateLimiter(client, "ap:test:", parse_rate_limits(""))
        owner = Principal(OWNER, "team-a")
        for _ in range(per_minute):
            await limiter.check(owner, method)
        with pytest.raises(errors.ServiceError) as refused:
            await limiter.check(owner, method)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another principal has its own allowance.
        await limiter.check(Principal(OWNER, "team-b"), method)
    finally:
        await client.aclose()


def test_a_burst_can_still_be_set_explicitly() -> None:
    limits = parse_rate_limits("SpawnAgent=10/min:2,RecordUsage=6000/min")
    assert (limits["SpawnAgent"].per_minute, limits["SpawnAgent"].burst) == (10, 2)
    assert limits["RecordUsage"].burst == 6000


def test_every_rpc_is_declared_read_or_write() -> None:
    """The rate class and the behaviour while Redis is down come from one table; a new
    RPC must be added to it (no rule is derived from a method's name)."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from agentplane.agent.v1 import agent_service_pb2
    from agentplane.thread.v1 import thread_service_pb2
    from agentplane.usage.v1 import usage_service_pb2
    from services.common import methods

    declared = set(methods.KINDS)
    for module, name in (
        (agent_service_pb2, "AgentService"),
        (thread_service_pb2, "ThreadService"),
        (usage_service_pb2, "UsageService"),
        (trace_service_pb2, "TraceService"),  # OTLP, on the usage service
    ):
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            assert method.name in declared, f"{name}.{method.name} is not in methods.KINDS"
            declared.discard(method.name)
    assert not declared, f"methods.KINDS names RPCs that do not exist: {declared}"
    limits = parse_rate_limits("")
    assert limits["RecordUsage"].per_minute == 600 and limits["WhoAmI"].per_minute == 600
    assert "GetThread" not in limits  # a plain read: default_read
