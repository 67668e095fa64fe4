"""The webhook dispatcher on its own, with the clock moved instead of waited for: retries
keep going for 24 hours and then stop; backoff is exponential, capped and jittered."""

from __future__ import annotations

import asyncio
import dataclasses
import time

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
            webhook_backoff_base_s=60.0, webhook_backoff_max_s=3600.0, webhook_timeout_s=1.0,
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


async def hostile_receiver(mode: str) -> asyncio.Server:
    """A receiver that answers 200 with an endless body ("flood"), or trickles its status
    line a byte at a time ("trickle")."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if mode == "flood":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
                chunk = b"x" * (1 << 20)
                while True:
                    writer.write(chunk)
                    await writer.drain()
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


@pytest.mark.parametrize("mode", ["flood", "trickle"])
async def test_a_hostile_receiver_cannot_hold_an_attempt_or_fill_memory(parts, mode) -> None:
    usage, budgets, dispatcher, _ = parts
    server = await hostile_receiver(mode)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    await budgets.add_webhook(WebhookRecord("w1", "p", url, ["budget.alert"], 0), "s")
    await budgets.create("p", "b", spec(limit_tokens=10, thresholds=(100,)))
    await usage.set_budget("t1", 10_000, "p", create=True)
    await usage.record([record("u1", 10)])
    async with httpx.AsyncClient() as client:
        began = time.monotonic()
        assert await dispatcher.poll(client) == 1
        async with asyncio.timeout(5):  # well within the lease (timeout + 5 s)
            await dispatcher.settle()
    assert time.monotonic() - began < 3
    (entry,) = (await budgets.deliveries("p", "w1", 0, 10)).items
    if mode == "flood":  # the status is all that is read: delivered, the body ignored
        assert entry.status == "DELIVERED" and entry.last_code == 200
    else:
        assert entry.status == "PENDING" and entry.last_error == "timed out"
    server.close()
