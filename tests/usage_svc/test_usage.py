"""Usage recording, costs, idempotency, budgets and reservations against a real Redis."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from agentplane.usage.v1 import usage_service_pb2 as U
from services.common.errors import details_of
from tests.helpers import expect_error


def record(usage_id: str, thread: str = "t1", agent: str = "a1", model: str = "gpt-4o", **kw):
    kw.setdefault("prompt_tokens", 100)
    kw.setdefault("completion_tokens", 50)
    kw.setdefault("latency_ms", 200)
    kw.setdefault("project_id", "demo")
    return U.RecordUsageRequest(
        usage_id=usage_id, thread_id=thread, agent_id=agent, model=model, **kw
    )


async def overview(stub, project_id: str = ""):
    return await stub.GetUsageOverview(U.GetUsageOverviewRequest(project_id=project_id))


async def test_record_prices_from_the_table_or_the_given_cost(usage_stub) -> None:
    priced = await usage_stub.RecordUsage(record("u1", prompt_tokens=1000, completion_tokens=500))
    # gpt-4o: 2.50 / 10.00 USD per million tokens → 2,500 + 5,000 micro-USD.
    assert priced.cost_micros == 7_500 and priced.cost_usd == pytest.approx(0.0075)
    assert not priced.duplicate and not priced.HasField("budget")
    given = await usage_stub.RecordUsage(record("u2", cost_usd=0.123456))
    assert given.cost_micros == 123_456
    unknown = await usage_stub.RecordUsage(record("u3", model="home-made-llm"))
    assert unknown.cost_micros == 0
    view = await overview(usage_stub)
    assert view.totals.request_count == 3 and view.totals.unpriced_request_count == 1
    assert view.totals.total_cost_micros == 7_500 + 123_456
    assert view.totals.total_tokens == 1500 + 150 + 150
    assert view.totals.avg_latency_ms == pytest.approx(200)
    agent = await usage_stub.GetAgentUsage(U.GetAgentUsageRequest(agent_id="a1"))
    assert agent.totals.total_tokens == 1800
    model = await usage_stub.GetModelUsage(U.GetModelUsageRequest(model="gpt-4o"))
    assert model.totals.request_count == 2
    nobody = await usage_stub.GetAgentUsage(U.GetAgentUsageRequest(agent_id="nobody"))
    assert nobody.totals.total_tokens == 0 and nobody.agent_id == "nobody"
    by_project = await overview(usage_stub, "demo")
    assert by_project.totals.total_tokens == 1800
    assert [a.agent_id for a in by_project.by_agent] == ["a1"]
    assert (await overview(usage_stub, "elsewhere")).totals.total_tokens == 0


async def test_same_usage_id_counts_once_with_the_same_answer(usage_stub) -> None:
    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=10_000)
    )
    first = await usage_stub.RecordUsage(record("dup"))
    await usage_stub.RecordUsage(record("other"))
    again = await usage_stub.RecordUsage(record("dup"))
    assert again.duplicate and not first.duplicate
    assert again.budget == first.budget and again.cost_micros == first.cost_micros
    error = await expect_error(
        usage_stub.RecordUsage(record("dup", prompt_tokens=101)),
        grpc.StatusCode.ALREADY_EXISTS,
        reason="USAGE_ALREADY_EXISTS",
    )
    assert "different body" in error.details()
    assert (await overview(usage_stub)).totals.request_count == 2


async def test_concurrent_replays_count_once(usage_stub) -> None:
    replies = await asyncio.gather(*(usage_stub.RecordUsage(record("same")) for _ in range(40)))
    assert sum(not r.duplicate for r in replies) == 1
    view = await overview(usage_stub)
    assert view.totals.request_count == 1 and view.totals.total_tokens == 150


async def test_budget_reads_never_create_one(usage_stub) -> None:
    await expect_error(
        usage_stub.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="none")),
        grpc.StatusCode.NOT_FOUND,
        reason="THREAD_BUDGET_NOT_FOUND",
    )
    await usage_stub.RecordUsage(record("u", thread="none"))
    await expect_error(
        usage_stub.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="none")),
        grpc.StatusCode.NOT_FOUND,
    )
    listed = await usage_stub.ListThreadBudgets(U.ListThreadBudgetsRequest())
    assert listed.total_size == 0 and listed.default_max_tokens == 100_000


async def test_reservations_hold_settle_release_and_close(usage_stub) -> None:
    made = await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=1000)
    )
    assert made.max_tokens == 1000 and made.remaining == 1000 and not made.is_closed
    held = await usage_stub.ReserveBudget(
        U.ReserveBudgetRequest(reservation_id="r1", thread_id="t1", tokens=600)
    )
    assert held.budget.reserved_tokens == 600 and held.budget.remaining == 400
    retry = await usage_stub.ReserveBudget(
        U.ReserveBudgetRequest(reservation_id="r1", thread_id="t1", tokens=600)
    )
    assert retry.budget.reserved_tokens == 600  # the same reservation, not a second one
    error = await expect_error(
        usage_stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="r2", thread_id="t1", tokens=401)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason="THREAD_BUDGET_EXHAUSTED",
    )
    quota = [d for d in details_of(error) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert quota and quota[0].violations[0].subject == "thread:t1"
    # Settling: the recorded usage replaces the hold.
    settled = await usage_stub.RecordUsage(
        record("u1", prompt_tokens=300, completion_tokens=200, reservation_id="r1")
    )
    assert settled.budget.reserved_tokens == 0 and settled.budget.total_tokens == 500
    assert settled.budget.percent_used == 50.0
    await usage_stub.ReserveBudget(
        U.ReserveBudgetRequest(reservation_id="r3", thread_id="t1", tokens=400)
    )
    released = await usage_stub.ReleaseReservation(
        U.ReleaseReservationRequest(thread_id="t1", reservation_id="r3")
    )
    assert released.released and released.budget.reserved_tokens == 0
    again = await usage_stub.ReleaseReservation(
        U.ReleaseReservationRequest(thread_id="t1", reservation_id="r3")
    )
    assert not again.released
    closed = await usage_stub.CloseThreadBudget(U.CloseThreadBudgetRequest(thread_id="t1"))
    assert closed.is_closed
    await expect_error(
        usage_stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="r4", thread_id="t1", tokens=1)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="THREAD_CLOSED",
    )
    # Usage that happened is still recorded on a closed thread, past the budget too.
    late = await usage_stub.RecordUsage(record("u2", prompt_tokens=900, completion_tokens=0))
    assert (
        late.budget.total_tokens == 1400 and late.budget.is_exhausted and late.budget.remaining == 0
    )
    await expect_error(
        usage_stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="r", thread_id="nobudget", tokens=1)
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_reservations_expire_after_their_ttl(usage_stub) -> None:
    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=100)
    )
    await usage_stub.ReserveBudget(
        U.ReserveBudgetRequest(
            reservation_id="short",
            thread_id="t1",
            tokens=100,
            ttl=duration_pb2.Duration(nanos=200_000_000),
        )
    )
    await expect_error(
        usage_stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="x", thread_id="t1", tokens=1)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    await asyncio.sleep(0.3)
    budget = await usage_stub.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="t1"))
    assert budget.reserved_tokens == 0 and budget.remaining == 100
    await usage_stub.ReserveBudget(
        U.ReserveBudgetRequest(reservation_id="y", thread_id="t1", tokens=100)
    )


async def test_list_thread_budgets_hottest_first_with_pages(usage_stub) -> None:
    for i in range(12):
        await usage_stub.SetThreadBudget(
            U.SetThreadBudgetRequest(project_id="demo", thread_id=f"t{i:02d}", max_tokens=1000)
        )
        await usage_stub.RecordUsage(
            record(f"u{i}", thread=f"t{i:02d}", prompt_tokens=i * 10, completion_tokens=0)
        )
    seen, token = [], ""
    for _ in range(3):
        page = await usage_stub.ListThreadBudgets(
            U.ListThreadBudgetsRequest(page_size=5, page_token=token)
        )
        assert page.total_size == 12 and page.default_max_tokens == 100_000
        seen += [b.thread_id for b in page.threads]
        token = page.next_page_token
    assert token == ""
    assert seen == [f"t{i:02d}" for i in reversed(range(12))]
    percents = [
        b.percent_used
        for b in (await usage_stub.ListThreadBudgets(U.ListThreadBudgetsRequest())).threads
    ]
    assert percents == sorted(percents, reverse=True) and percents[0] == 11.0
    await expect_error(
        usage_stub.ListThreadBudgets(U.ListThreadBudgetsRequest(page_token="%%%")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_token",
    )


async def test_default_budget_and_active_threads(usage_stub) -> None:
    made = await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="d")
    )
    assert made.max_tokens == 100_000
    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="e", max_tokens=5)
    )
    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="other", thread_id="f", max_tokens=5)
    )
    assert (await overview(usage_stub)).active_threads == 3
    assert (await overview(usage_stub, "demo")).active_threads == 2  # once always 0
    await usage_stub.SetThreadBudget(  # a change is not a new budget
        U.SetThreadBudgetRequest(project_id="demo", thread_id="e", max_tokens=7)
    )
    await usage_stub.CloseThreadBudget(U.CloseThreadBudgetRequest(thread_id="e"))
    await usage_stub.CloseThreadBudget(U.CloseThreadBudgetRequest(thread_id="e"))  # idempotent
    assert (await overview(usage_stub)).active_threads == 2
    assert (await overview(usage_stub, "demo")).active_threads == 1
    assert (await overview(usage_stub, "other")).active_threads == 1


BAD_RECORDS = [
    ({"prompt_tokens": -1}, "prompt_tokens"),
    ({"completion_tokens": 10**9}, "completion_tokens"),
    ({"usage_id": ""}, "usage_id"),
    ({"thread": "a|b"}, "thread_id"),
    ({"agent": ""}, "agent_id"),
    ({"model": ""}, "model"),
    ({"latency_ms": -5}, "latency_ms"),
    ({"cost_usd": -0.5}, "cost_usd"),
    ({"cost_usd": float("nan")}, "cost_usd"),
]


@pytest.mark.parametrize(("change", "field"), BAD_RECORDS, ids=[f for _, f in BAD_RECORDS])
async def test_bad_records_are_refused_and_write_nothing(usage_stub, change, field) -> None:
    kwargs = dict(change)
    usage_id = kwargs.pop("usage_id", "u-bad")
    await expect_error(
        usage_stub.RecordUsage(record(usage_id, **kwargs)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field=field,
    )
    assert (await overview(usage_stub)).totals.request_count == 0


async def test_batch_answers_each_record_on_its_own(usage_stub) -> None:
    reply = await usage_stub.RecordUsageBatch(
        U.RecordUsageBatchRequest(
            requests=[
                record("b1", thread="x"),
                record("b2", prompt_tokens=-3),
                record("b3", thread="y"),
                record("b1", thread="x"),
                record("b1", thread="x", completion_tokens=1),
            ]
        )
    )
    codes = [r.status.code for r in reply.results]
    assert codes == [
        0,
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
        0,
        grpc.StatusCode.ALREADY_EXISTS.value[0],
    ]
    assert [r.usage_id for r in reply.results] == ["b1", "b2", "b3", "b1", "b1"]
    assert reply.results[3].response.duplicate and not reply.results[0].response.duplicate
    assert "requests[1].prompt_tokens" in reply.results[1].status.message
    assert (await overview(usage_stub)).totals.request_count == 2
    await expect_error(
        usage_stub.RecordUsageBatch(
            U.RecordUsageBatchRequest(requests=[record(f"z{i}") for i in range(1001)])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="requests",
    )
    assert (await overview(usage_stub)).totals.request_count == 2


async def test_reset_usage_erases_everything(usage_stub) -> None:
    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=10)
    )
    await usage_stub.RecordUsage(record("u1"))
    reply = await usage_stub.ResetUsage(U.ResetUsageRequest())
    assert reply.deleted_keys > 0
    assert (await overview(usage_stub)).totals.request_count == 0
    await expect_error(
        usage_stub.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="t1")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_cache_writes_and_estimates_are_counted_and_priced(usage_stub) -> None:
    """Every token kind a provider bills: cache reads and writes as parts of the prompt,
    each at its own price (a cache write at the prompt price unless one is set); an
    estimated record counts as one in `estimated_request_count`."""
    from agentplane.usage.v1 import usage_pb2 as B

    await usage_stub.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
        model="claude-test", prompt_per_million_usd=3.0, completion_per_million_usd=15.0,
        cached_prompt_per_million_usd=0.3, cache_write_per_million_usd=3.75)))  # fmt: skip
    done = await usage_stub.RecordUsage(record(
        "cw1", model="claude-test", prompt_tokens=10_000, cached_prompt_tokens=6_000,
        cache_write_tokens=2_000, completion_tokens=1_000, reasoning_tokens=100))  # fmt: skip
    # 2,000 plain x 3 + 6,000 read x 0.3 + 2,000 written x 3.75 + 1,000 out x 15 (per M)
    assert done.cost_micros == 6_000 + 1_800 + 7_500 + 15_000
    await usage_stub.RecordUsage(record("cw2", model="claude-test", prompt_tokens=40,
                                        completion_tokens=60, estimated=True))  # fmt: skip
    totals = (await usage_stub.GetModelUsage(U.GetModelUsageRequest(model="claude-test"))).totals
    assert (totals.cache_write_tokens, totals.cached_prompt_tokens) == (2_000, 6_000)
    assert (totals.request_count, totals.estimated_request_count) == (2, 1)
    listed = await usage_stub.ListModelPrices(U.ListModelPricesRequest(model="claude-test"))
    assert listed.prices[0].cache_write_per_million_usd == 3.75
    # gpt-4o has no cache-write price: the prompt price stands in.
    plain = await usage_stub.RecordUsage(record("cw3", prompt_tokens=1000, cache_write_tokens=1000,
                                                completion_tokens=0))  # fmt: skip
    assert plain.cost_micros == 2_500
    for bad in ({"cache_write_tokens": 9_000, "cached_prompt_tokens": 2_000},
                {"cache_write_tokens": -1}):  # fmt: skip
        await expect_error(
            usage_stub.RecordUsage(record("cw-bad", prompt_tokens=10_000, **bad)),
            grpc.StatusCode.INVALID_ARGUMENT, field="cache_write_tokens",
        )  # fmt: skip


async def test_a_call_outside_any_thread_is_reserved_and_recorded(cluster) -> None:
    """A call without a thread (what the model gateway makes for an agent that names
    none): its project's budgets cover the reservation, and the record counts in every
    total but no thread's."""
    from agentplane.usage.v1 import usage_pb2 as B
    from tests.helpers import make_project, make_type, spawn

    usage_stub = cluster.usage
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agent = await spawn(cluster.agent, "a1")

    cap = await usage_stub.CreateBudget(U.CreateBudgetRequest(project_id="demo", budget=B.Budget(
        scope=B.BUDGET_SCOPE_PROJECT, limit_tokens=1_000, period=B.BUDGET_PERIOD_DAY)))  # fmt: skip
    held = await usage_stub.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="free-1", project_id="demo", tokens=800, agent_id=agent.id))  # fmt: skip
    assert held.thread_id == "" and held.tokens == 800
    await expect_error(
        usage_stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="free-2", project_id="demo", tokens=300)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    await expect_error(
        usage_stub.ReserveBudget(U.ReserveBudgetRequest(reservation_id="x", tokens=3)),
        grpc.StatusCode.INVALID_ARGUMENT, field="project_id",
    )  # fmt: skip
    await usage_stub.RecordUsage(record("free-u1", thread="", reservation_id="free-1", agent=agent.id,
                                        prompt_tokens=100, completion_tokens=20))  # fmt: skip
    budget = await usage_stub.GetBudget(
        U.GetBudgetRequest(project_id="demo", budget_id=cap.budget_id)
    )
    assert (budget.used_tokens, budget.reserved_tokens) == (120, 0)
    assert (await overview(usage_stub, "demo")).totals.total_tokens == 120
    again = await usage_stub.RecordUsage(record("free-u1", thread="", agent=agent.id, prompt_tokens=100,
                                                completion_tokens=20, reservation_id="free-1"))  # fmt: skip
    assert again.duplicate
    gone = await usage_stub.ReleaseReservation(U.ReleaseReservationRequest(
        reservation_id="free-1", project_id="demo"))  # fmt: skip
    assert not gone.released  # settled already


async def test_a_hold_charged_on_expiry_is_recorded_in_full_once(usage_stub, redis_target) -> None:
    """A caller that dies mid-call: its hold, made with on_expiry=CHARGE, is recorded in
    full as estimated usage when its ttl passes, even when nothing else touches the
    project; a second pass (another replica) counts it once."""
    from services.common.redis import create_redis
    from services.usage_svc.expiry import ExpiredHolds
    from services.usage_svc.store import UsageStore
    from tests.helpers.servers import make_settings

    await usage_stub.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="dies", max_tokens=10_000)
    )
    await usage_stub.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="dying", thread_id="dies", tokens=700, agent_id="a1", model="gpt-4o",
        ttl=duration_pb2.Duration(nanos=200_000_000),
        on_expiry=U.EXPIRY_ACTION_CHARGE))  # fmt: skip
    await usage_stub.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="released", project_id="demo", tokens=50,
        ttl=duration_pb2.Duration(nanos=200_000_000)))  # fmt: skip
    await asyncio.sleep(0.3)
    redis = create_redis(make_settings("usage_svc", redis_target.url, redis_target.cluster))
    try:
        replicas = [ExpiredHolds(redis, UsageStore(redis, 8, 600)) for _ in range(2)]
        charged = await asyncio.gather(*(r.sweep() for r in replicas))
        assert sum(charged) == 1
    finally:
        await redis.aclose()
    budget = await usage_stub.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="dies"))
    assert (budget.prompt_tokens, budget.reserved_tokens) == (700, 0)
    totals = (await overview(usage_stub, "demo")).totals
    assert (totals.prompt_tokens, totals.request_count, totals.estimated_request_count) == (
        700, 1, 1)  # fmt: skip
