"""Limits per minute and hour, and calls in flight (SPEC §15), on the store with a real
Redis, standalone and on the three-master cluster. The clock is moved, not waited for:
windows slide at one-second resolution, and no 60 consecutive whole seconds admit more
than the limit, whatever the concurrency; every covering budget and limit is checked and
taken in one step (a refusal takes nothing); a refusal says when room frees, exactly."""

from __future__ import annotations

import asyncio

from services.usage_svc.periods import Period
from services.usage_svc.usage_types import Hold, Outcome
from tests.usage_svc.test_budget_store import make, record, spec, world  # noqa: F401

TOKENS = 10


def hold(rid: str, tokens: int = TOKENS, ttl_ms: int = 600_000) -> Hold:
    return Hold(rid, "t1", tokens, 0, ttl_ms, agent_id="a1", model="m", key_id="k1")


async def reserve_many(usage, n: int, prefix: str, **kw) -> list[Outcome]:  # type: ignore[no-untyped-def]
    done = await asyncio.gather(*(usage.reserve(hold(f"{prefix}{i}", **kw)) for i in range(n)))
    return [d.outcome for d in done]


async def state(budgets, budget_id: str):  # type: ignore[no-untyped-def]
    (found,) = await budgets.current("p", [budget_id])
    return found


async def test_64_concurrent_reservations_never_pass_a_token_window(world) -> None:  # noqa: F811
    usage, budgets, clock, _ = world
    await make(budgets, "tpm", spec(limit_tokens=100, period=Period.MINUTE))
    outcomes = await reserve_many(usage, 64, "a")
    assert outcomes.count(Outcome.OK) == 10  # 10 x 10 tokens: the limit, never more
    now = await state(budgets, "tpm")
    assert (now.used_tokens, now.reserved_tokens, now.used_requests) == (0, 100, 10)
    clock.ms += 59_000  # still inside the same 60 s
    assert (await reserve_many(usage, 8, "b")).count(Outcome.OK) == 0
    clock.ms += 1_000  # the first second has left the window: room again
    assert (await reserve_many(usage, 64, "c")).count(Outcome.OK) == 10


async def test_no_60_consecutive_seconds_admit_more_than_the_limit(world) -> None:  # noqa: F811
    """Greedy callers every few seconds for four minutes; then every 60-second span of the
    admissions (by the second each was admitted in) is summed."""
    usage, budgets, clock, _ = world
    await make(budgets, "tpm", spec(limit_tokens=100, period=Period.MINUTE))
    admitted: dict[int, int] = {}
    start = clock.ms
    for step in range(80):
        clock.ms = start + step * 3_100  # not on whole seconds
        for outcome in await reserve_many(usage, 6, f"s{step}-", tokens=7):
            if outcome == Outcome.OK:
                second = clock.ms // 1000
                admitted[second] = admitted.get(second, 0) + 7
    first, last = min(admitted), max(admitted)
    spans = [sum(admitted.get(s, 0) for s in range(a, a + 60)) for a in range(first, last + 1)]
    assert max(spans) <= 100
    assert max(spans) >= 91  # and the window is used, not starved (13 x 7)


async def test_requests_per_minute_admit_exactly_the_limit(world) -> None:  # noqa: F811
    usage, budgets, clock, _ = world
    await make(budgets, "rpm", spec(limit_tokens=0, limit_requests=5, period=Period.MINUTE))
    assert (await reserve_many(usage, 64, "a")).count(Outcome.OK) == 5
    # A record made without a reservation is a request too.
    await usage.record([record("u1", 3)])
    assert (await state(budgets, "rpm")).used_requests == 6
    clock.ms += 60_000
    assert (await reserve_many(usage, 64, "b")).count(Outcome.OK) == 5


async def test_max_in_flight_counts_open_reservations(world) -> None:  # noqa: F811
    usage, budgets, clock, _ = world
    await make(budgets, "par", spec(limit_tokens=0, max_in_flight=4, period=Period.DAY))
    outcomes = await reserve_many(usage, 64, "a", ttl_ms=5_000)
    held = [f"a{i}" for i, o in enumerate(outcomes) if o == Outcome.OK]
    assert len(held) == 4 and (await state(budgets, "par")).in_flight == 4
    await usage.release("t1", held[0])  # one slot frees: exactly one more is admitted
    assert (await reserve_many(usage, 64, "b", ttl_ms=5_000)).count(Outcome.OK) == 1
    await usage.record([record("u-settle", 4, reservation_id=held[1])])  # settling frees one
    assert (await reserve_many(usage, 64, "c", ttl_ms=5_000)).count(Outcome.OK) == 1
    assert (await state(budgets, "par")).in_flight == 4
    clock.ms += 5_001  # a holder that died: its slots free at expiry
    assert (await state(budgets, "par")).in_flight == 0
    assert (await reserve_many(usage, 64, "d")).count(Outcome.OK) == 4


async def test_a_refusal_by_one_limit_takes_nothing_from_the_others(world) -> None:  # noqa: F811
    usage, budgets, _, _ = world
    await make(budgets, "cal", spec(limit_tokens=1000, period=Period.DAY))
    await make(budgets, "win", spec("AGENT", "a1", limit_tokens=1000, period=Period.MINUTE))
    await make(budgets, "par", spec("MODEL", "m", limit_tokens=0, max_in_flight=1))
    assert (await usage.reserve(hold("first"))).outcome == Outcome.OK
    before = [await state(budgets, b) for b in ("cal", "win", "par")]
    refused = await usage.reserve(hold("second"))
    assert refused.outcome == Outcome.EXHAUSTED
    assert [(r.subject, r.kind) for r in refused.refused] == [("budget:par", "inflight")]
    assert [await state(budgets, b) for b in ("cal", "win", "par")] == before
    thread = (await usage.budgets(["t1"]))[0]
    assert thread is not None and thread.reserved_tokens == TOKENS  # the first's, only


async def test_a_window_refusal_says_when_room_frees_to_the_second(world) -> None:  # noqa: F811
    usage, budgets, clock, _ = world
    await make(budgets, "tpm", spec(limit_tokens=30, period=Period.MINUTE))
    start = clock.ms - clock.ms % 1000 + 250  # a quarter into a second
    clock.ms = start
    assert (await usage.reserve(hold("a", 20))).outcome == Outcome.OK
    clock.ms = start + 20_000
    assert (await usage.reserve(hold("b", 10))).outcome == Outcome.OK
    clock.ms = start + 30_000
    refused = await usage.reserve(hold("c", 15))
    (why,) = refused.refused
    assert why.kind == "window"
    # Room for 15 comes when the first second's 20 tokens leave: 60 s after that second
    # began, 30.25 s from now.
    assert why.wait_ms == 60_000 - 30_000 - 250
    clock.ms += why.wait_ms - 1_000  # a second early: still no room
    assert (await usage.reserve(hold("d", 15))).outcome == Outcome.EXHAUSTED
    clock.ms += 1_000  # then, as promised
    assert (await usage.reserve(hold("e", 15))).outcome == Outcome.OK
    # A call larger than the window allows can never fit: no wait is promised.
    too_big = await usage.reserve(hold("f", 31))
    assert [r.wait_ms for r in too_big.refused] == [-1]


async def test_a_settled_reservation_counts_its_actual_usage_in_its_admission_second(
    world,  # noqa: F811
) -> None:
    usage, budgets, clock, _ = world
    await make(budgets, "tpm", spec(limit_tokens=100, period=Period.MINUTE))
    await usage.reserve(hold("big", 80))
    clock.ms += 30_000
    await usage.record([record("u1", 25, reservation_id="big")])  # 80 held, 25 used
    now = await state(budgets, "tpm")
    assert (now.used_tokens, now.reserved_tokens, now.used_requests) == (25, 0, 1)
    await usage.reserve(hold("small", 10))
    await usage.release("t1", "small")  # a release gives its share back
    assert (await state(budgets, "tpm")).reserved_tokens == 0
    clock.ms += 30_000  # the admission second of "big" leaves: its 25 tokens with it
    now = await state(budgets, "tpm")
    assert (now.used_tokens, now.used_requests) == (0, 1)  # "small" still counts as a request


async def test_a_flexible_hold_takes_what_the_tightest_budget_has_room_for(world) -> None:  # noqa: F811
    """`least_tokens` (ReserveBudget.min_tokens): the model gateway asks for its ceiling and
    accepts less, down to a minimal answer; the hold is what the tightest HARD budget has
    room for — a window, a calendar budget or the thread's — and the cost estimate scales."""
    usage, budgets, clock, _ = world
    await make(budgets, "tpm", spec(limit_tokens=100, period=Period.MINUTE))
    await make(budgets, "day", spec(limit_tokens=250, period=Period.DAY))
    wide = Hold("f1", "t1", 500, 5_000, 600_000, agent_id="a1", model="m", least_tokens=16)
    first = await usage.reserve(wide)
    assert (first.outcome, first.tokens) == (Outcome.OK, 100)  # the minute window's room
    assert (await state(budgets, "tpm")).reserved_tokens == 100
    again = await usage.reserve(wide)  # a retry answers the same hold
    assert (again.outcome, again.tokens) == (Outcome.OK, 100)
    refused = await usage.reserve(Hold("f2", "t1", 500, 0, 600_000, least_tokens=16))
    assert refused.outcome == Outcome.EXHAUSTED  # not even 16 fit in the window
    clock.ms += 60_000
    second = await usage.reserve(Hold("f3", "t1", 500, 0, 600_000, least_tokens=16))
    assert (second.outcome, second.tokens) == (Outcome.OK, 100)
    clock.ms += 60_000
    third = await usage.reserve(Hold("f4", "t1", 500, 0, 600_000, least_tokens=16))
    assert (third.outcome, third.tokens) == (Outcome.OK, 50)  # the day's 250 - 200 held
    exact = await usage.reserve(Hold("f5", "t1", 500, 0, 600_000))  # least 0: all or nothing
    assert exact.outcome == Outcome.EXHAUSTED
    await usage.set_budget("t2", 40, "p", create=True)  # the thread's own budget is tighter
    clock.ms += 86_400_000
    fourth = await usage.reserve(Hold("f6", "t2", 500, 0, 600_000, least_tokens=16))
    assert (fourth.outcome, fourth.tokens) == (Outcome.OK, 40)
