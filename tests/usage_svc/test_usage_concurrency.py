"""Many clients on two replicas against one budget, and the accounting invariants."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from services.usage_svc.server import create_server
from tests.helpers import authed_channel
from tests.helpers.servers import make_settings


@pytest.fixture
async def two_replicas(redis_target):
    apps, channels = [], []
    for _ in range(2):
        app, port = await create_server(
            make_settings("usage_svc", redis_target.url, redis_target.cluster), "127.0.0.1:0"
        )
        await app.start()
        apps.append(app)
        channels.append(authed_channel(f"127.0.0.1:{port}"))
    yield [usage_service_pb2_grpc.UsageServiceStub(c) for c in channels]
    for channel in channels:
        await channel.close()
    for app in apps:
        await app.stop(grace=0)


async def test_concurrent_reservations_never_exceed_the_budget(two_replicas) -> None:
    a, b = two_replicas
    await a.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="hot", max_tokens=1000)
    )

    async def attempt(i: int) -> bool:
        stub = two_replicas[i % 2]
        try:
            await stub.ReserveBudget(
                U.ReserveBudgetRequest(reservation_id=f"r{i}", thread_id="hot", tokens=7)
            )
            return True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    accepted = sum(await asyncio.gather(*(attempt(i) for i in range(400))))
    assert accepted == 1000 // 7  # every hold that fits is granted, and no more
    budget = await b.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="hot"))
    assert budget.reserved_tokens == accepted * 7 <= budget.max_tokens


async def test_concurrent_records_on_two_replicas_sum_exactly(two_replicas) -> None:
    rng = random.Random(7)
    records = [
        U.RecordUsageRequest(
            usage_id=f"u{i}", thread_id=f"t{rng.randrange(20)}", agent_id=f"a{rng.randrange(5)}",
            model=rng.choice(["gpt-4o", "claude-3-5-haiku", "custom"]), project_id="p",
            prompt_tokens=rng.randrange(1, 5000), completion_tokens=rng.randrange(0, 2000),
            latency_ms=rng.randrange(1, 900),
        )
        for i in range(600)
    ]  # fmt: skip
    # Each record is sent twice, to both replicas at once: retries must not double count.
    sends = [stub.RecordUsage(r) for r in records for stub in two_replicas]
    replies = await asyncio.gather(*sends)
    assert sum(not r.duplicate for r in replies) == len(records)
    totals = (await two_replicas[0].GetUsageOverview(U.GetUsageOverviewRequest())).totals
    assert totals.request_count == len(records)
    assert totals.prompt_tokens == sum(r.prompt_tokens for r in records)
    assert totals.completion_tokens == sum(r.completion_tokens for r in records)
    assert totals.total_cost_micros == sum(r.cost_micros for r in replies if not r.duplicate)


def thread_project(thread: int) -> str:
    return "p1" if thread < 5 else "p2"


record_strategy = st.fixed_dictionaries(
    {
        "thread": st.integers(0, 12),  # t0-t9 have budgets (t0-t4 in p1, t5-t9 in p2)
        "agent": st.integers(0, 6),
        "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "o1", "mystery"]),
        "project": st.sampled_from(["", "p1", "p2", "own"]),
        "prompt": st.integers(0, 10**6),
        "completion": st.integers(0, 10**6),
        "cost": st.one_of(st.none(), st.floats(0, 50, allow_nan=False)),
        "latency": st.integers(0, 60_000),
        "replay": st.booleans(),
    }
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workload=st.lists(record_strategy, min_size=1, max_size=40))
async def test_invariants_after_a_random_workload(two_replicas, workload) -> None:
    """totals = Σ by_agent = Σ by_model = Σ over threads, whatever the workload."""
    stub = two_replicas[0]
    await stub.ResetUsage(U.ResetUsageRequest())
    for t in range(10):
        await stub.SetThreadBudget(
            U.SetThreadBudgetRequest(
                project_id=thread_project(t), thread_id=f"t{t}", max_tokens=10**9
            )
        )
    # A thread budget's records are made in its project (or with none: then in its).
    for item in workload:
        if item["thread"] < 10 and item["project"] not in ("", thread_project(item["thread"])):
            item["project"] = "own"
        if item["project"] == "own":
            item["project"] = thread_project(item["thread"]) if item["thread"] < 10 else ""
        if item["thread"] < 10:
            item["project"] = thread_project(item["thread"]) if item["project"] else ""
    sends = []
    for i, item in enumerate(workload):
        request = U.RecordUsageRequest(
            usage_id=f"u{i}", thread_id=f"t{item['thread']}", agent_id=f"a{item['agent']}",
            model=item["model"], project_id=item["project"], prompt_tokens=item["prompt"],
            completion_tokens=item["completion"], latency_ms=item["latency"],
        )  # fmt: skip
        if item["cost"] is not None:
            request.cost_usd = item["cost"]
        sends.append(two_replicas[i % 2].RecordUsage(request))
        if item["replay"]:
            sends.append(two_replicas[(i + 1) % 2].RecordUsage(request))
    await asyncio.gather(*sends)

    overview = await stub.GetUsageOverview(U.GetUsageOverviewRequest())
    totals = overview.totals
    assert totals.request_count == len(workload)
    for part in (overview.by_agent, overview.by_model):
        assert sum(x.totals.total_tokens for x in part) == totals.total_tokens
        assert sum(x.totals.total_cost_micros for x in part) == totals.total_cost_micros
        assert sum(x.totals.request_count for x in part) == totals.request_count
    threads = await stub.ListThreadBudgets(U.ListThreadBudgetsRequest(page_size=100))
    unbudgeted = sum(w["prompt"] + w["completion"] for w in workload if w["thread"] >= 10)
    assert sum(t.total_tokens for t in threads.threads) + unbudgeted == totals.total_tokens
    projects = [
        (await stub.GetUsageOverview(U.GetUsageOverviewRequest(project_id=p))).totals.total_tokens
        for p in ("p1", "p2")
    ]
    unscoped = sum(
        w["prompt"] + w["completion"] for w in workload if not w["project"] and w["thread"] >= 10
    )
    assert sum(projects) + unscoped == totals.total_tokens
