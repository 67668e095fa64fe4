"""The UsageStorage contract, against the Redis store itself (standalone and cluster):
records counted once, budgets and reservations with their outcomes, exact sums."""

from __future__ import annotations

import pytest

from services.common.pagination import parse_page
from services.usage_svc.store import UsageStorage, UsageStore
from services.usage_svc.usage_types import Hold, Outcome, UsageRecord
from tests.helpers.servers import store_clients


@pytest.fixture
async def store(redis_target):
    async with store_clients("usage_svc", redis_target) as (redis, _streams):
        yield UsageStore(redis, shards=4, usage_id_ttl_s=600)


def usage(usage_id: str, thread: str = "t1", agent: str = "a1", model: str = "m", **kw):
    fields = dict(
        usage_id=usage_id, thread_id=thread, agent_id=agent, project_id="p", model=model,
        prompt_tokens=100, completion_tokens=50, cost_micros=7, latency_ms=10,
        unpriced=False, reservation_id="", fingerprint=f"body-{usage_id}",
    )  # fmt: skip
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def hold(thread: str, reservation: str, tokens: int) -> Hold:
    return Hold(reservation, thread, tokens, cost_micros=0, ttl_ms=60_000)


async def test_records_count_once_and_sum_everywhere(store: UsageStorage) -> None:
    first = await store.record_one(usage("u1"))
    assert first.outcome == Outcome.NEW and first.cost_micros == 7 and first.budget is None
    again = await store.record_one(usage("u1"))
    assert again.outcome == Outcome.DUPLICATE
    other = await store.record_one(usage("u1", fingerprint="another body"))
    assert other.outcome == Outcome.CONFLICT
    batch = await store.record([usage(f"b{i}", thread=f"t{i}", model="n") for i in range(10)])
    assert [o.outcome for o in batch] == [Outcome.NEW] * 10
    assert (await store.agent_counters("a1")).requests == 11
    assert (await store.model_counters("n")).prompt == 1000
    overview = await store.overview("", 10)
    assert overview.totals.requests == 11 and overview.totals.cost_micros == 77
    assert sum(c.requests for _, c in overview.by_model) == 11
    assert sum(c.requests for _, c in overview.by_agent) == 11
    assert (await store.overview("p", 10)).totals.requests == 11


async def test_budgets_reservations_and_their_outcomes(store: UsageStorage) -> None:
    assert await store.set_budget("t", 1000, "p", create=False) is None  # none to change
    created = await store.set_budget("t", 1000, "p", create=True)
    assert created is not None and created.max_tokens == 1000
    assert await store.set_budget("t", 1000, "q", create=True) is None  # another project's
    assert await store.budget_project("t") == (True, "p")
    held = await store.reserve(hold("t", "r1", 600))
    assert held.outcome == Outcome.OK and held.state.reserved_tokens == 600 and held.expire_ms
    assert (await store.reserve(hold("t", "r1", 600))).outcome == Outcome.OK  # a retry
    assert (await store.reserve(hold("t", "r1", 700))).outcome == Outcome.CONFLICT
    refused = await store.reserve(hold("t", "r2", 500))
    assert refused.outcome == Outcome.EXHAUSTED and refused.state.reserved_tokens == 600
    settled = await store.record_one(usage("u", thread="t", reservation_id="r1"))
    assert settled.budget is not None and settled.budget.reserved_tokens == 0
    assert settled.budget.prompt_tokens + settled.budget.completion_tokens == 150
    held = await store.reserve(hold("t", "r3", 100))
    released = await store.release("t", "r3")
    assert released.outcome == Outcome.OK and released.released
    assert not (await store.release("t", "r3")).released
    assert (await store.release("none", "r")).outcome == Outcome.NO_BUDGET
    closed = await store.close_budget("t")
    assert closed.outcome == Outcome.OK and closed.state.closed
    assert (await store.reserve(hold("t", "r4", 1))).outcome == Outcome.CLOSED
    assert (await store.reserve(hold("none", "r", 1))).outcome == Outcome.NO_BUDGET
    assert (await store.close_budget("none")).outcome == Outcome.NO_BUDGET
    (state,) = await store.budgets(["t"])
    assert state is not None and state.closed and state.max_tokens == 1000
    assert await store.budgets(["none"]) == [None]


async def test_hottest_budgets_page_exactly(store: UsageStorage) -> None:
    for i in range(7):
        await store.set_budget(f"t{i}", 1000, "p", create=True)
        await store.record_one(usage(f"u{i}", thread=f"t{i}", prompt_tokens=100 * i))
    seen, token = [], ""
    while True:
        page = parse_page(3, token, 0, ("budgets",))
        states, token, total = await store.hottest_budgets(page)
        assert total == 7
        seen += [s.thread_id for s in states]
        if not token:
            break
    assert seen == [f"t{i}" for i in reversed(range(7))]  # hottest first, each once
