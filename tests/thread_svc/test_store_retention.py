"""The thread store's bounds, on the store itself (standalone and cluster): the message
cap drops the oldest with what it left, acknowledged inbox entries leave the stream, and
removal is bounded, idempotent and safe with two replicas sweeping at once."""

from __future__ import annotations

import asyncio

import pytest

from services.common import tuning
from services.common.partitions import RetentionSweeper
from services.thread_svc.store import Keys, NewMessage, NewThread, RequestKey, ThreadStore
from tests.helpers.leftovers import mentions
from tests.helpers.servers import store_clients
from tests.thread_svc.test_store_contract import page


@pytest.fixture
async def clients(redis_target):
    async with store_clients("thread_svc", redis_target) as pair:
        yield pair


def message(thread_id: str, sender: str, to: str, n: int) -> NewMessage:
    return NewMessage(f"01M{n:023d}", thread_id, sender, to, "text", f'{{"n": {n}}}', True)


async def test_the_cap_drops_the_oldest_messages_with_all_they_left(clients, redis_target) -> None:
    redis, streams = clients
    store = ThreadStore(redis, 600, streams, max_messages=10)
    await store.create_thread(NewThread("capped", "p", "", "", ("a", "b")))
    for n in range(25):
        sender, to = ("a", "b") if n % 2 else ("b", "a")
        await store.post(
            message("capped", sender, to, n), RequestKey("post:capped", f"r{n}", "capped")
        )
    record = await store.get_thread("capped")
    assert record is not None and record.message_count == 25 and record.dropped == 15
    kept, _ = await store.thread_messages("capped", page(100))
    assert [m.payload_json for m in kept] == [f'{{"n": {n}}}' for n in range(15, 25)]
    of_a, _, total_a = await store.thread_agent_messages("capped", "a", page(100))
    across, _, total_across = await store.agent_messages("p", "a", page(100))
    assert total_a == total_across == 10 and len(of_a) == len(across) == 10
    keys = Keys("p")
    assert await redis.xlen(keys.inbox("a")) + await redis.xlen(keys.inbox("b")) == 10
    dropped_ids = [f"01M{n:023d}" for n in range(15)]
    assert not mentions(redis_target.url, redis_target.cluster, dropped_ids)


async def test_acknowledged_inbox_entries_leave_the_stream(clients) -> None:
    redis, streams = clients
    store = ThreadStore(redis, 600, streams)
    await store.create_thread(NewThread("busy", "p", "", "", ("a", "b")))
    await store.ensure_group("p", "b")
    longest = 0
    for n in range(300):
        await store.post(message("busy", "a", "b", n), None)
        if n % 20 == 19:
            got = await store.deliveries("p", "b", "c1", False, 100)
            assert await store.ack("p", "b", [d.ack_id for d in got]) == len(got) == 20
            longest = max(longest, await redis.xlen(Keys("p").inbox("b")))
    assert longest == 0 and await redis.xlen(Keys("p").inbox("b")) == 0
    listed, _ = await store.thread_messages("busy", page(5))
    assert len(listed) == 5  # the thread's log keeps the messages


async def test_two_replicas_removing_at_once_leave_nothing_and_fail_nothing(
    redis_target,
) -> None:
    async with (
        store_clients("thread_svc", redis_target) as (redis1, streams1),
        store_clients("thread_svc", redis_target) as (redis2, streams2),
    ):
        one = ThreadStore(redis1, 600, streams1, max_messages=5000)
        two = ThreadStore(redis2, 600, streams2, max_messages=5000)
        doomed = [f"gone-{n}" for n in range(12)]
        for n, thread_id in enumerate(doomed):
            project = f"proj-{n % 3}"
            await one.create_thread(NewThread(thread_id, project, "", "", ("a", "b")))
            # One long log, so removal takes several bounded steps.
            for m in range(1200 if n == 0 else 20):
                await one.post(message(thread_id, "a", "b", n * 10_000 + m), None)
            await one.end_thread(thread_id, "COMPLETED", "")
        await one.create_thread(NewThread("kept", "proj-0", "", "", ("a", "b")))
        await one.post(message("kept", "a", "b", 999_999), None)

        sweepers = [
            RetentionSweeper(r, s, 0.0, "threads", due=s.installation)
            for r, s in ((redis1, one), (redis2, two))
        ]
        removed = await asyncio.gather(*(s.sweep() for s in sweepers))
        assert sum(removed) == len(doomed)  # claimed once each: no double work
        # Removal itself is idempotent: both replicas removing one thread at once.
        await asyncio.gather(one.remove("proj-0", "gone-0"), two.remove("proj-0", "gone-0"))
        assert not mentions(redis_target.url, redis_target.cluster, ["gone-"])
        for store in (one, two):
            assert await store.get_thread("gone-3") is None
            kept = await store.get_thread("kept")
            assert kept is not None and kept.message_count == 1
        listed, _, total = await one.list_threads("-", "", "", page(50))
        assert [t.id for t in listed] == ["kept"] and total == 1


async def test_a_remover_that_dies_half_way_is_taken_over_after_its_lease(
    clients, redis_target, monkeypatch
) -> None:
    redis, streams = clients
    monkeypatch.setattr(tuning, "RETENTION_LEASE_MS", 500)
    store = ThreadStore(redis, 600, streams)
    await store.create_thread(NewThread("half", "p", "", "", ("a", "b")))
    for n in range(1200):
        await store.post(message("half", "a", "b", n), None)
    await store.end_thread("half", "COMPLETED", "")

    class Dying(ThreadStore):
        async def remove(self, partition: str, item_id: str) -> bool:
            # One bounded step of the removal, then the replica is gone.
            await self._remove(keys=[Keys(partition).prefix], args=[item_id, 500])
            raise ConnectionError("replica killed mid-removal")

    dying = Dying(redis, 600, streams)
    with pytest.raises(ConnectionError):
        await RetentionSweeper(redis, dying, 0.0, "threads", due=dying.installation).sweep()
    assert await redis.xlen(Keys("p").log("half")) == 1201 - 500  # half done
    survivor = RetentionSweeper(redis, store, 0.0, "threads", due=store.installation)
    assert await survivor.sweep() == 0  # still leased to the dead replica
    await asyncio.sleep(0.6)
    assert await survivor.sweep() == 1  # the lease ran out: taken over and finished
    assert not mentions(redis_target.url, redis_target.cluster, ["half"])
