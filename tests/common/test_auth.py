"""The authenticator under a crowd: a thousand calls arriving together with a key not yet
cached ask the agent service once, not a thousand times (found by the model gateway's
storm test: the lookups timed out and every call was refused with 503)."""

from __future__ import annotations

import asyncio

import pytest

from services.common import errors
from services.common.auth import AGENT, Authenticator, Principal

TOKEN = "apk_" + "0" * 26 + "." + "s" * 43


async def test_concurrent_calls_with_an_uncached_key_share_one_lookup() -> None:
    asked = 0

    async def lookup(key_id: str, token: str) -> Principal | None:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.05)
        return Principal(AGENT, "agent-1", "p1", key_id)

    auth = Authenticator("", lookup, cache_s=5.0)
    found = await asyncio.gather(*(auth.authenticate(f"Bearer {TOKEN}") for _ in range(1000)))
    assert asked == 1 and {p.subject for p in found} == {"agent-1"}
    await auth.authenticate(f"Bearer {TOKEN}")
    assert asked == 1  # and then from the cache


async def test_a_shared_lookup_that_fails_fails_each_waiter_and_is_not_kept() -> None:
    asked = 0

    async def lookup(key_id: str, token: str) -> Principal | None:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.01)
        return None

    auth = Authenticator("", lookup, cache_s=5.0)
    results = await asyncio.gather(
        *(auth.authenticate(f"Bearer {TOKEN}") for _ in range(10)), return_exceptions=True
    )
    assert asked == 1 and all(isinstance(r, errors.ServiceError) for r in results)
    with pytest.raises(errors.ServiceError):
        await auth.authenticate(f"Bearer {TOKEN}")
    assert asked == 2  # a refusal is not cached
