"""Default rate limits: a method's burst is its per-minute count (the seed's "20/minute"
admits 20 spawns at once; the 21st waits)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis

from services.common import errors
from services.common.auth import OWNER, Principal, RateLimiter, parse_rate_limits


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
