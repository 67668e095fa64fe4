"""Budgets in storage, standalone and on a real three-master Redis Cluster: one record moves
every covering budget at once; HARD budgets refuse reservations and name themselves;
periods open by themselves (the clock is moved, not waited for); alerts fire once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.usage_svc.budget_store import BudgetSpec, BudgetStore
from services.usage_svc.keys import Layout
from services.usage_svc.periods import Period
from services.usage_svc.store import UsageStore
from services.usage_svc.usage_types import Hold, Outcome, UsageRecord
from tests.helpers.servers import store_clients

HOUR_MS = 3_600_000


def at(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def world(redis_target):
    async with store_clients("usage_svc", redis_target) as (redis, streams):
        clock = Clock(at(2026, 3, 7, 17))  # Saturday noon in New York, the day before DST
        layout = Layout(4)
        budgets = BudgetStore(redis, layout, clock)
        usage = UsageStore(redis, 4, 600, periods=budgets, clock=clock)
        await usage.set_budget("t1", 10_000, "p", create=True)
        yield usage, budgets, clock, streams


def spec(scope: str = "PROJECT", scope_id: str = "", **kw) -> BudgetSpec:
    fields = dict(scope=scope, scope_id=scope_id, limit_tokens=1000, limit_cost_micros=0,
                  period=Period.DAY, time_zone="UTC", enforcement="HARD",
                  thresholds=(50, 80, 100))  # fmt: skip
    fields.update(kw)
    return BudgetSpec(**fields)  # type: ignore[arg-type]


def record(usage_id: str, tokens: int, **kw) -> UsageRecord:
    fields = dict(usage_id=usage_id, thread_id="t1", agent_id="a1", project_id="p", model="m",
                  prompt_tokens=tokens, completion_tokens=0, cost_micros=tokens * 2,
                  latency_ms=1, unpriced=False, reservation_id="", fingerprint=usage_id,
                  key_id="k1")  # fmt: skip
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


async def make(budgets: BudgetStore, budget_id: str, s: BudgetSpec) -> str:
    assert await budgets.create("p", budget_id, s) == "OK"
    return budget_id


async def used(budgets: BudgetStore, budget_id: str) -> tuple[int, int, int]:
    found = await budgets.get("p", budget_id)
    assert found is not None
    return found.used_tokens, found.used_cost_micros, found.reserved_tokens


async def test_one_record_moves_every_covering_budget(world) -> None:
    usage, budgets, _, _ = world
    covering = [
        await make(budgets, "b-project", spec()),
        await make(budgets, "b-agent", spec("AGENT", "a1")),
        await make(budgets, "b-model", spec("MODEL", "m", limit_tokens=0, limit_cost_micros=9)),
        await make(budgets, "b-key", spec("API_KEY", "k1")),
    ]
    others = [
        await make(budgets, "b-agent2", spec("AGENT", "a2")),
        await make(budgets, "b-model2", spec("MODEL", "other")),
        await make(budgets, "b-key2", spec("API_KEY", "k2")),
    ]
    outcomes = await usage.record([record("u1", 100), record("u2", 50), record("u1", 100)])
    assert [o.outcome for o in outcomes] == [Outcome.NEW, Outcome.NEW, Outcome.DUPLICATE]
    for budget_id in covering:
        assert await used(budgets, budget_id) == (150, 300, 0), budget_id
    for budget_id in others:
        assert await used(budgets, budget_id) == (0, 0, 0), budget_id
    (thread,) = await usage.budgets(["t1"])
    assert thread is not None and thread.prompt_tokens == 150
    # Another project's budgets are not touched by this project's records.
    assert await budgets.create("q", "b-q", spec()) == "OK"
    await usage.record([record("u3", 10)])
    found = await budgets.get("q", "b-q")
    assert found is not None and found.used_tokens == 0
    listed = await budgets.list_budgets("p", "AGENT", "", 0, 10)
    assert [b.budget_id for b in listed.items] == ["b-agent", "b-agent2"] and listed.total == 2
    assert [b.budget_id for b in (await budgets.list_budgets("p", "AGENT", "a1", 0, 10)).items] == [
        "b-agent"
    ]


async def test_reservations_hold_every_hard_budget_and_give_back_exactly(world) -> None:
    usage, budgets, clock, _ = world
    await make(budgets, "hard", spec(limit_tokens=100))
    await make(budgets, "soft", spec("AGENT", "a1", limit_tokens=10, enforcement="SOFT"))
    await make(budgets, "cost", spec("MODEL", "m", limit_tokens=0, limit_cost_micros=1000))

    def hold(rid: str, tokens: int, ttl_ms: int = 60_000, cost: int = 0) -> Hold:
        return Hold(rid, "t1", tokens, cost, ttl_ms, agent_id="a1", model="m", key_id="k1")

    first = await usage.reserve(hold("r1", 60, cost=600))
    assert first.outcome == Outcome.OK
    assert await used(budgets, "hard") == (0, 0, 60)
    assert await used(budgets, "soft") == (0, 0, 60)  # held, though a SOFT budget never refuses
    refused = await usage.reserve(hold("r2", 50, cost=500))
    assert refused.outcome == Outcome.EXHAUSTED
    assert sorted(r.subject for r in refused.refused) == ["budget:cost", "budget:hard"]
    assert await used(budgets, "hard") == (0, 0, 60)  # a refusal holds nothing anywhere
    # Settling gives back exactly what was held; the usage is charged instead.
    await usage.record([record("u1", 40, reservation_id="r1")])
    assert await used(budgets, "hard") == (40, 80, 0)
    assert await used(budgets, "cost") == (40, 80, 0)
    # A hold that lapses is given back without anyone settling it.
    assert (await usage.reserve(hold("r3", 60, ttl_ms=1000))).outcome == Outcome.OK
    assert await used(budgets, "hard") == (40, 80, 60)
    clock.ms += 2000
    assert await used(budgets, "hard") == (40, 80, 0)
    assert (await usage.reserve(hold("r4", 60))).outcome == Outcome.OK
    released = await usage.release("t1", "r4")
    assert released.released and await used(budgets, "hard") == (40, 80, 0)
    # A budget deleted while held: giving back touches only what still exists.
    assert (await usage.reserve(hold("r5", 10))).outcome == Outcome.OK
    assert await budgets.delete("p", "soft")
    assert (await usage.release("t1", "r5")).released
    assert await budgets.get("p", "soft") is None
    assert await used(budgets, "hard") == (40, 80, 0)


async def test_periods_open_by_themselves_and_keep_history(world) -> None:
    usage, budgets, clock, _ = world
    await make(budgets, "day", spec(time_zone="America/New_York", limit_tokens=10_000))
    await make(budgets, "month", spec(period=Period.MONTH, limit_tokens=10_000))
    await make(budgets, "life", spec(period=Period.LIFETIME, limit_tokens=10_000))
    await usage.record([record("u1", 100)])
    day = await budgets.get("p", "day")
    assert day is not None and day.period_start_ms == at(2026, 3, 7, 5)  # 00:00 EST
    assert day.period_end_ms == at(2026, 3, 8, 5)
    # The next day is the 23-hour spring-forward day: no job runs, a read sees it at zero.
    clock.ms = at(2026, 3, 8, 15)
    day = await budgets.get("p", "day")
    assert day is not None and day.used_tokens == 0
    assert (day.period_start_ms, day.period_end_ms) == (at(2026, 3, 8, 5), at(2026, 3, 9, 4))
    await usage.record([record("u2", 7)])
    assert await used(budgets, "day") == (7, 14, 0)
    history = await budgets.periods("p", "day", 0, 10)
    assert [(p.start_ms, p.used_tokens) for p in history.items] == [(at(2026, 3, 7, 5), 100)]
    # Months without traffic: the record that comes starts every period at zero.
    clock.ms = at(2026, 7, 14, 12)
    await usage.record([record("u3", 5)])
    assert await used(budgets, "day") == (5, 10, 0)
    assert await used(budgets, "month") == (5, 10, 0)
    assert await used(budgets, "life") == (112, 224, 0)  # a lifetime never rolls
    month = await budgets.get("p", "month")
    assert month is not None and month.period_start_ms == at(2026, 7, 1)
    months = await budgets.periods("p", "month", 0, 10)
    assert [(p.start_ms, p.used_tokens) for p in months.items] == [(at(2026, 3, 1), 107)]
    days = await budgets.periods("p", "day", 0, 10)
    assert [p.used_tokens for p in days.items] == [7, 100]  # newest first


async def test_alerts_fire_once_per_threshold_and_a_reset_rearms_them(world) -> None:
    usage, budgets, _, streams = world
    await make(budgets, "b", spec(limit_tokens=1000))
    for i, tokens in enumerate([400, 200, 150, 50, 300, 500]):  # 40 60 75 80 110 160 %
        await usage.record([record(f"u{i}", tokens)])
    alerts = await budgets.read_alerts(streams, "p", "0-0", 10)
    assert [(a.threshold, a.percent_used) for a in alerts] == [(50, 60.0), (80, 80.0), (100, 110.0)]
    start = (await budgets.get("p", "b")).period_start_ms  # type: ignore[union-attr]
    assert [a.alert_id for a in alerts] == [f"b.{start}.{t}" for t in (50, 80, 100)]
    assert await budgets.alert_entry("p", alerts[0].alert_id) == alerts[0].entry_id
    # After a reset the thresholds fire again, with ids that tell them apart.
    assert await budgets.reset("p", "b", "owner:alice")
    found = await budgets.get("p", "b")
    assert found is not None and found.used_tokens == 0 and found.reset_by == "owner:alice"
    await usage.record([record("u9", 1000)])  # 0 → 100 %: three thresholds in one step
    again = await budgets.read_alerts(streams, "p", alerts[-1].entry_id, 10)
    assert [a.alert_id for a in again] == [f"b.{start}.{t}.r1" for t in (50, 80, 100)]
    # Lowering the limit past a threshold raises it at once; raising it raises nothing.
    await make(budgets, "c", spec(limit_tokens=100_000))
    await usage.record([record("u10", 600)])
    assert await budgets.update("p", "c", {"lt": "1000"})
    late = await budgets.read_alerts(streams, "p", again[-1].entry_id, 10)
    assert [(a.budget_id, a.threshold) for a in late] == [("c", 50)]


async def test_limits_on_budgets_per_project_and_scope(world) -> None:
    _, budgets, _, _ = world
    for i in range(10):
        assert await budgets.create("p", f"b{i}", spec("AGENT", "a1")) == "OK"
    assert await budgets.create("p", "b10", spec("AGENT", "a1")) == "CROWDED"
    assert await budgets.create("p", "b11", spec("AGENT", "a2")) == "OK"
