"""Usage over time, prices with effective times, and the export: bucket sums equal the
records in them for every granularity and grouping (hypothesis, with the clock moved, on a
standalone Redis and a real cluster); cost arithmetic; CSV/JSON downloads."""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict

import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from services.common.convert import now_ms
from services.usage_svc.pricing import DatedPrice, Price, PriceBook
from services.usage_svc.store import UsageStore
from services.usage_svc.usage_types import DAY_MS, HOUR_MS, SeriesQuery, UsageRecord
from tests.helpers import ADMIN_TOKEN, expect_error, make_project
from tests.helpers.servers import serve_gateway, start_cluster, stop_cluster, store_clients
from tests.usage_svc.test_budget_store import Clock, at

# Recent days: a bucket older than its retention is gone at once (it expires by itself).
START = (now_ms() // DAY_MS - 4) * DAY_MS


@pytest.fixture
async def series_store(redis_target):
    async with store_clients("usage_svc", redis_target) as (redis, _streams):
        clock = Clock(START)
        yield UsageStore(redis, 4, 600, clock=clock), clock


record_strategy = st.fixed_dictionaries({
    "offset_min": st.integers(0, 3 * 24 * 60),  # three days of minutes
    "project": st.sampled_from(["p", "q", ""]),
    "agent": st.sampled_from(["a1", "a2", "a3"]),
    "model": st.sampled_from(["m1", "m2"]),
    "prompt": st.integers(0, 5000),
    "completion": st.integers(0, 5000),
    "cost": st.integers(0, 10**7),
})  # fmt: skip


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workload=st.lists(record_strategy, min_size=1, max_size=40))
async def test_buckets_sum_exactly_the_records_in_them(series_store, workload) -> None:
    store, clock = series_store
    await store.reset()
    workload = sorted(workload, key=lambda w: w["offset_min"])
    for first in range(0, len(workload), 3):  # batches of up to 3 records, one script each
        batch = workload[first : first + 3]
        for w in batch:
            w["offset_min"] = batch[0]["offset_min"]  # a batch arrives at one time
        clock.ms = START + batch[0]["offset_min"] * 60_000
        await store.record([UsageRecord(
            usage_id=f"u{first + i}", thread_id="t", agent_id=w["agent"],
            project_id=w["project"], model=w["model"], prompt_tokens=w["prompt"],
            completion_tokens=w["completion"], cost_micros=w["cost"], latency_ms=3,
            unpriced=False, reservation_id="", fingerprint=f"u{first + i}",
            cached_prompt_tokens=w["prompt"] // 3, reasoning_tokens=w["completion"] // 2)
            for i, w in enumerate(batch)])  # fmt: skip
    end = START + 4 * DAY_MS
    for project in ("p", "-"):
        mine = [w for w in workload if project == "-" or w["project"] == project]
        for step in (HOUR_MS, DAY_MS):
            for group_by, key in (("", None), ("agent", "agent"), ("model", "model")):
                expected: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
                for w in mine:
                    ms = START + w["offset_min"] * 60_000
                    slot = (ms - ms % step, w[key] if key else "")
                    for j, v in enumerate((w["prompt"], w["completion"], 1, w["cost"],
                                           w["prompt"] // 3)):  # fmt: skip
                        expected[slot][j] += v
                series = await store.time_series(SeriesQuery(project, START, end, step, group_by))
                got = {(s, g): [c.prompt, c.completion, c.requests, c.cost_micros,
                                c.cached_prompt] for s, g, c in series}  # fmt: skip
                assert got == dict(expected), (project, step, group_by)
                # The groups of a bucket add up to its total.
                totals = await store.time_series(SeriesQuery(project, START, end, step))
                for start, _, total in totals:
                    parts = [c for s, _, c in series if s == start]
                    assert sum(c.prompt for c in parts) == total.prompt
                    assert sum(c.cost_micros for c in parts) == total.cost_micros
        # One agent's series is its share of the ungrouped one.
        only = await store.time_series(SeriesQuery(project, START, end, DAY_MS, agent_id="a1"))
        assert sum(c.requests for _, _, c in only) == sum(w["agent"] == "a1" for w in mine)


async def test_buckets_expire_by_themselves(series_store, redis_target) -> None:
    store, clock = series_store
    async with store_clients("usage_svc", redis_target) as (redis, _):
        store = UsageStore(redis, 4, 600, clock=clock, retention_s=(3600, 7200))
        clock.ms = at(2030, 1, 1, 5)  # the bucket's retention counts from its start
        await store.record([UsageRecord(
            usage_id="x", thread_id="t", agent_id="a", project_id="p", model="m",
            prompt_tokens=1, completion_tokens=1, cost_micros=1, latency_ms=1, unpriced=False,
            reservation_id="", fingerprint="x")])  # fmt: skip
        partition = store.layout.partition("p")
        hour_key = f"{partition.prefix}ts:h:{at(2030, 1, 1, 5)}"
        day_key = f"{partition.prefix}ts:d:{at(2030, 1, 1)}"
        assert await redis.expiretime(hour_key) == at(2030, 1, 1, 6) // 1000
        assert await redis.expiretime(day_key) == at(2030, 1, 1, 2) // 1000


def test_costs_in_micro_usd_with_cached_reasoning_and_per_request_prices() -> None:
    book = PriceBook([
        DatedPrice("gpt-x", 0, Price(2.5, 10.0, 1.25, 0.0)),
        DatedPrice("gpt-*", 0, Price(1.0, 2.0)),
        DatedPrice("gpt-x-*", 0, Price(3.0, 4.0, None, 0.002)),
        DatedPrice("o9", 0, Price(15.0, 60.0)),
        DatedPrice("o9", 5_000, Price(10.0, 40.0, 2.5, 0.01)),
    ])  # fmt: skip
    # 1,000 prompt of which 400 cached, 500 completion (reasoning is part of completion):
    # 600 x 2.5 + 400 x 1.25 + 500 x 10 micro-USD.
    assert book.cost_micros("gpt-x", 1000, 500, 400, 10) == 1500 + 500 + 5000
    # Patterns: the longest match wins; cached defaults to the prompt price; per call.
    assert book.cost_micros("gpt-x-mini", 1000, 500, 400, 10) == 3000 + 2000 + 2000
    assert book.cost_micros("gpt-4o", 1000, 500, 0, 10) == 1000 + 1000
    assert book.cost_micros("claude", 1000, 500, 0, 10) is None
    # A price with a later effective time takes over then, and not before.
    assert book.cost_micros("o9", 1000, 0, 0, 4_999) == 15_000
    assert book.cost_micros("o9", 1000, 0, 0, 5_000) == 10_000 + 10_000
    assert book.estimate_micros("o9", 100, 5_000) == 4_000 + 10_000
    assert book.estimate_micros("unknown", 100, 5_000) == 0
    # A pattern only counts if it has a price in force then.
    later = PriceBook([DatedPrice("a-*", 0, Price(1, 1)), DatedPrice("a-b*", 100, Price(9, 9))])
    assert later.cost_micros("a-bc", 10, 0, 0, 50) == 10
    assert later.cost_micros("a-bc", 10, 0, 0, 150) == 90


def ts(ms: int) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromMilliseconds(ms)
    return value


@pytest.fixture
async def stack(redis_target):
    cluster = await start_cluster(redis_target.url, redis_target.cluster)
    await make_project(cluster.agent, "demo")
    yield cluster
    await stop_cluster(cluster)


async def test_dated_prices_never_rewrite_the_past(stack) -> None:
    usage = stack.usage
    now = now_ms()
    await usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
        model="acme-*", prompt_per_million_usd=1.0, completion_per_million_usd=2.0,
        effective_time=ts(0))))  # fmt: skip
    await usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
        model="acme-*", prompt_per_million_usd=100.0, completion_per_million_usd=200.0,
        effective_time=ts(now + 3_600_000))))  # fmt: skip
    first = await usage.RecordUsage(U.RecordUsageRequest(
        usage_id="u1", thread_id="t", agent_id="a", project_id="demo", model="acme-7",
        prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=100,
        reasoning_tokens=50))  # fmt: skip
    assert first.cost_micros == 1000 + 200  # the price in force now, not the future one
    await usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
        model="acme-*", prompt_per_million_usd=10.0, completion_per_million_usd=20.0,
        cached_prompt_per_million_usd=5.0, per_request_usd=0.001,
        effective_time=ts(now))))  # fmt: skip
    second = await usage.RecordUsage(U.RecordUsageRequest(
        usage_id="u2", thread_id="t", agent_id="a", project_id="demo", model="acme-7",
        prompt_tokens=1000, completion_tokens=100, cached_prompt_tokens=100))  # fmt: skip
    assert second.cost_micros == 900 * 10 + 100 * 5 + 100 * 20 + 1000
    overview = await usage.GetUsageOverview(U.GetUsageOverviewRequest(project_id="demo"))
    assert overview.totals.total_cost_micros == first.cost_micros + second.cost_micros
    assert overview.totals.cached_prompt_tokens == 200 and overview.totals.reasoning_tokens == 50
    listed = await usage.ListModelPrices(U.ListModelPricesRequest())
    acme = [p for p in listed.prices if p.model == "acme-*"]
    assert [p.effective_time.ToMilliseconds() for p in acme] == [0, now, now + 3_600_000]
    assert any(p.model == "gpt-4o" for p in listed.prices)  # seeded from the file
    await usage.DeleteModelPrice(U.DeleteModelPriceRequest(model="acme-*", effective_time=ts(now)))
    await expect_error(
        usage.DeleteModelPrice(U.DeleteModelPriceRequest(model="acme-*", effective_time=ts(now))),
        grpc.StatusCode.NOT_FOUND,
    )
    for price, field in (
        (B.ModelPrice(model="a*b", prompt_per_million_usd=1), "price.model"),
        (B.ModelPrice(model="m", prompt_per_million_usd=-1), "price.prompt_per_million_usd"),
        (B.ModelPrice(model="m", per_request_usd=float("nan")), "price.per_request_usd"),
    ):
        await expect_error(usage.SetModelPrice(U.SetModelPriceRequest(price=price)),
                           grpc.StatusCode.INVALID_ARGUMENT, field=field)  # fmt: skip
    await expect_error(
        usage.RecordUsage(U.RecordUsageRequest(
            usage_id="u3", thread_id="t", agent_id="a", project_id="demo", model="m",
            prompt_tokens=10, cached_prompt_tokens=11)),
        grpc.StatusCode.INVALID_ARGUMENT, field="cached_prompt_tokens",
    )  # fmt: skip


async def test_time_series_rpc_and_its_export(stack) -> None:
    usage = stack.usage
    rng = random.Random(3)
    for i in range(30):
        await usage.RecordUsage(U.RecordUsageRequest(
            usage_id=f"u{i}", thread_id="t", agent_id=f"a{i % 3}", project_id="demo",
            model=rng.choice(["m1", "m2"]), prompt_tokens=rng.randrange(100), latency_ms=1,
            completion_tokens=rng.randrange(100), cost_usd=0.5))  # fmt: skip
    start = now_ms() - 2 * DAY_MS
    request = U.GetUsageTimeSeriesRequest(
        project_id="demo", granularity=B.GRANULARITY_HOUR, start_time=ts(start),
        group_by=B.USAGE_GROUP_BY_MODEL)  # fmt: skip
    series = await usage.GetUsageTimeSeries(request)
    assert series.totals.request_count == 30 and series.totals.total_cost_micros == 15_000_000
    assert sorted({b.group for b in series.buckets}) == ["m1", "m2"]
    bad = [
        (dict(granularity=B.GRANULARITY_UNSPECIFIED), "granularity"),
        (dict(end_time=ts(start - HOUR_MS)), "end_time"),
        (dict(end_time=ts(start + 2000 * HOUR_MS)), "end_time"),
        (dict(agent_id="a1"), "agent_id"),  # grouped by model: no agent-and-model buckets
    ]
    for fields, field in bad:
        wrong = U.GetUsageTimeSeriesRequest()
        wrong.CopyFrom(request)
        for name, value in fields.items():
            if isinstance(value, timestamp_pb2.Timestamp):
                getattr(wrong, name).CopyFrom(value)
            else:
                setattr(wrong, name, value)
        await expect_error(usage.GetUsageTimeSeries(wrong), grpc.StatusCode.INVALID_ARGUMENT,
                           field=field)  # fmt: skip
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    params = {"granularity": "hour", "group_by": "model",
              "start_time": ts(start).ToJsonString()}  # fmt: skip
    async with serve_gateway(stack) as base, httpx.AsyncClient(base_url=base) as http:
        answer = await http.get("/api/v1/projects/demo/usage:export", params=params,
                                headers=headers)  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/csv")
        assert 'filename="usage-demo-' in answer.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(answer.text)))
        assert len(rows) == len(series.buckets)
        for row, bucket in zip(rows, series.buckets, strict=True):
            assert row["group"] == bucket.group
            assert int(row["total_tokens"]) == bucket.totals.total_tokens
            assert int(row["total_cost_micros"]) == bucket.totals.total_cost_micros
        empty = await http.get("/api/v1/projects/demo/usage:export", headers=headers, params={
            **params, "start_time": ts(start - 10 * DAY_MS).ToJsonString(),
            "end_time": ts(start - 9 * DAY_MS).ToJsonString()})  # fmt: skip
        assert empty.status_code == 200
        assert list(csv.reader(io.StringIO(empty.text))) == [list(rows[0].keys())]
        as_json = await http.get("/api/v1/projects/demo/usage:export", headers=headers,
                                 params={**params, "format": "json"})  # fmt: skip
        assert as_json.headers["content-type"] == "application/json"
        body = json.loads(as_json.text)
        assert sum(b["request_count"] for b in body["buckets"]) == 30
        # A model name that a spreadsheet would run as a formula is exported inert.
        await usage.RecordUsage(U.RecordUsageRequest(
            usage_id="evil", thread_id="t", agent_id="a0", project_id="demo",
            model="=HYPERLINK(\"http://x\")", prompt_tokens=1))  # fmt: skip
        again = await http.get("/api/v1/projects/demo/usage:export", params=params,
                               headers=headers)  # fmt: skip
        groups = [row["group"] for row in csv.DictReader(io.StringIO(again.text))]
        assert '\'=HYPERLINK("http://x")' in groups and not any(g.startswith("=") for g in groups)
        refused = await http.get("/api/v1/projects/demo/usage:export", headers=headers,
                                 params={**params, "format": "xml"})  # fmt: skip
        assert refused.status_code == 400


async def test_the_price_history_stays_bounded_and_pages(stack) -> None:
    """20,000 SetModelPrice calls once grew one table that every replica re-reads whole
    (RecordUsage p99 180 ms at 14,130 entries) and GET /prices answered 4 MB. A model keeps
    its newest 50 prices (older ones no longer in force are dropped), and the list pages."""
    MAX_PRICES_PER_MODEL = 50  # as documented
    usage = stack.usage
    now = now_ms()
    for i in range(120):  # past prices, oldest first: the last is the one in force
        await usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
            model="hist-*", prompt_per_million_usd=float(i + 1), completion_per_million_usd=1.0,
            effective_time=ts(now - 10_000_000 + i * 1000))))  # fmt: skip
    mine = await usage.ListModelPrices(U.ListModelPricesRequest(model="hist-*"))
    times = [p.effective_time.ToMilliseconds() for p in mine.prices]
    assert len(times) == MAX_PRICES_PER_MODEL and not mine.next_page_token
    assert times == [now - 10_000_000 + i * 1000 for i in range(70, 120)]  # the newest kept
    # Unset cached price shows what is charged: the prompt price.
    assert mine.prices[-1].cached_prompt_per_million_usd == 120.0
    priced = await usage.RecordUsage(U.RecordUsageRequest(
        usage_id="h1", thread_id="t", agent_id="a", project_id="demo", model="hist-x",
        prompt_tokens=1000))  # fmt: skip
    assert priced.cost_micros == 120 * 1000
    # Prices still to come are never dropped: past 50 of them, a new one is refused.
    for i in range(MAX_PRICES_PER_MODEL):
        await usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
            model="future-*", prompt_per_million_usd=1.0,
            effective_time=ts(now + 3_600_000 + i))))  # fmt: skip
    await expect_error(
        usage.SetModelPrice(U.SetModelPriceRequest(price=B.ModelPrice(
            model="future-*", prompt_per_million_usd=1.0, effective_time=ts(now + 7_200_000)))),
        grpc.StatusCode.FAILED_PRECONDITION, reason="TOO_MANY_PRICES",
    )  # fmt: skip
    # Every price, a page at a time, each once.
    seen, token = [], ""
    while True:
        page = await usage.ListModelPrices(U.ListModelPricesRequest(page_size=7, page_token=token))
        assert len(page.prices) <= 7
        seen += [(p.model, p.effective_time.ToMilliseconds()) for p in page.prices]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert sum(m == "hist-*" for m, _ in seen) == 50 and sum(m == "future-*" for m, _ in seen) == 50
    await expect_error(
        usage.ListModelPrices(U.ListModelPricesRequest(page_token="bogus")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_token",
    )
