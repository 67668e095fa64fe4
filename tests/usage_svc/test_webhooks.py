"""The webhook dispatcher on its own, with the clock moved instead of waited for: retries
keep going for 24 hours and then stop; backoff is exponential, capped and jittered."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from services.usage_svc.budget_store import BudgetStore, WebhookRecord
from services.usage_svc.keys import Layout
from services.usage_svc.periods import Period
from services.usage_svc.server import claim_json
from services.usage_svc.store import UsageStore
from services.usage_svc.webhooks import Dispatcher, backoff_s
from tests.helpers.receiver import Receiver
from tests.helpers.servers import make_settings, store_clients
from tests.usage_svc.test_budget_store import Clock, at, record, spec

HOUR_MS = 3_600_000


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for attempt in range(1, 40):
        ceiling = min(3600.0, 2.0 ** (attempt - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff_s(attempt, 1.0, 3600.0) <= ceiling
    assert len({backoff_s(5, 1.0, 3600.0) for _ in range(20)}) > 1  # jittered


@pytest.fixture
async def parts(redis_target):
    async with store_clients("usage_svc", redis_target) as (redis, _streams):
        clock = Clock(at(2026, 5, 4, 9))
        layout = Layout(4)
        budgets = BudgetStore(redis, layout, clock)
        usage = UsageStore(redis, 4, 600, periods=budgets, clock=clock)
        settings = dataclasses.replace(
            make_settings("usage_svc", redis_target.url, redis_target.cluster),
            webhook_backoff_base_s=60.0, webhook_backoff_max_s=3600.0,
        )  # fmt: skip
        yield usage, budgets, Dispatcher(budgets, layout, settings, claim_json, clock), clock


async def test_retries_last_24_hours_then_the_delivery_fails(parts) -> None:
    usage, budgets, dispatcher, clock = parts
    receiver = await Receiver(statuses=[500] * 1000).start()
    await budgets.add_webhook(WebhookRecord("w1", "p", receiver.url, ["budget.alert"], 0), "s")
    await budgets.create("p", "b", spec(limit_tokens=10, period=Period.MONTH, thresholds=(100,)))
    await usage.set_budget("t1", 10_000, "p", create=True)
    await usage.record([record("u1", 10)])
    created = clock.ms
    attempts = 0
    async with httpx.AsyncClient() as client:
        while True:
            claimed = await dispatcher.poll(client)
            await dispatcher.settle()
            attempts += claimed
            (entry,) = (await budgets.deliveries("p", "w1", 0, 10)).items
            if entry.status != "PENDING":
                break
            assert claimed or entry.next_ms > clock.ms  # nothing due is claimed early
            assert clock.ms - created < 25 * HOUR_MS
            clock.ms = entry.next_ms  # straight to the next attempt
    assert entry.status == "FAILED" and entry.attempts == attempts == len(receiver.deliveries)
    assert entry.last_code == 500
    last_retry = max(d.headers["agentplane-timestamp"] for d in receiver.deliveries)
    assert int(last_retry) * 1000 - created >= 24 * HOUR_MS  # retried for at least 24 h
    assert await dispatcher.poll(client) == 0  # a failed delivery is not tried again
    await receiver.stop()
