"""The ThreadStorage contract, against the Redis store itself (standalone and cluster):
what the servicer may rely on, in the store's own terms (records, outcomes, pages)."""

from __future__ import annotations

import pytest

from services.common.pagination import parse_page
from services.thread_svc.store import (
    NewMessage,
    NewThread,
    Outcome,
    RequestKey,
    ThreadStorage,
    ThreadStore,
)
from tests.helpers.servers import store_clients


@pytest.fixture
async def store(redis_target):
    async with store_clients("thread_svc", redis_target) as (redis, streams):
        yield ThreadStore(redis, request_ttl_s=600, streams=streams)


def page(size: int = 20, token: str = "", *filters: object):
    return parse_page(size, token, 0, ("contract", *filters))


def message(thread_id: str, sender: str, to: str, n: int, agent: bool = True) -> NewMessage:
    return NewMessage(f"01M{n:023d}", thread_id, sender, to, "text", f'{{"n": {n}}}', agent)


async def test_threads_are_created_once_read_listed_and_ended(store: ThreadStorage) -> None:
    assert await store.create_thread(NewThread("t1", "p", "first", "", ("a", "b")))
    assert not await store.create_thread(NewThread("t1", "p", "again", "", ()))
    assert await store.create_thread(NewThread("t2", "p", "second", '{"k": 1}', ("a",)))
    record = await store.get_thread("t1")
    assert record is not None and record.status == "ACTIVE" and record.participants == ("a", "b")
    assert record.title == "first" and record.message_count == 0 and record.end_ms is None
    assert await store.get_thread("nope") is None
    first, token, total = await store.list_threads("p", "", "", page(1))
    assert [t.id for t in first] == ["t2"] and total == 2 and token  # newest first
    second, token, _ = await store.list_threads("p", "", "", page(1, token))
    assert [t.id for t in second] == ["t1"] and token == ""
    by_agent, _, _ = await store.list_threads("p", "b", "ACTIVE", page())
    assert [t.id for t in by_agent] == ["t1"]

    ended = await store.end_thread("t1", "KILLED", "runaway")
    assert ended.outcome == Outcome.OK and ended.status == "ACTIVE"
    assert (await store.end_thread("t1", "KILLED", "")).outcome == Outcome.SAME
    again = await store.end_thread("t1", "COMPLETED", "")
    assert again.outcome == Outcome.NOT_ACTIVE and again.status == "KILLED"
    assert (await store.end_thread("nope", "KILLED", "")).outcome == Outcome.NO_THREAD
    killed, _, total = await store.list_threads("p", "", "KILLED", page())
    assert [t.id for t in killed] == ["t1"] and total == 1
    active, _, _ = await store.list_threads("p", "", "ACTIVE", page())
    assert [t.id for t in active] == ["t2"]
    record = await store.get_thread("t1")
    assert record is not None and record.status == "KILLED" and record.end_ms is not None


async def test_posts_are_logged_indexed_idempotent_and_refused_on_ended_threads(
    store: ThreadStorage,
) -> None:
    await store.create_thread(NewThread("t", "p", "", "", ("a",)))
    posted = await store.post(message("t", "a", "b", 1), None)
    assert posted.outcome == Outcome.OK and posted.message is not None
    assert posted.message.payload_json == '{"n": 1}' and posted.message.thread_id == "t"
    key = RequestKey("post:t", "r1", "t")
    once = await store.post(message("t", "a", "b", 2), key)
    twice = await store.post(message("t", "a", "b", 3), key)
    assert twice.outcome == Outcome.DUPLICATE and twice.message == once.message
    assert await store.earlier_message(key) == once.message
    assert await store.earlier_message(RequestKey("post:t", "never", "t")) is None
    await store.post(message("t", "b", "a", 4), None)
    record = await store.get_thread("t")
    assert record is not None and record.message_count == 3 and record.participants == ("a", "b")

    listed, token = await store.thread_messages("t", page(2))
    assert [m.payload_json for m in listed] == ['{"n": 1}', '{"n": 2}'] and token
    rest, token = await store.thread_messages("t", page(2, token))
    assert [m.payload_json for m in rest] == ['{"n": 4}'] and token == ""
    of_b, _, total = await store.thread_agent_messages("t", "b", page())
    assert total == 3 and len(of_b) == 3
    across, _, total = await store.agent_messages("p", "a", page())
    assert total == 3 and across[0].payload_json == '{"n": 4}'  # newest first
    latest = await store.latest_messages("t", 2)
    assert [m.payload_json for m in latest] == ['{"n": 2}', '{"n": 4}']

    assert (await store.post(message("none", "a", "b", 5), None)).outcome == Outcome.NO_THREAD
    await store.end_thread("t", "COMPLETED", "")
    refused = await store.post(message("t", "a", "b", 6), None)
    assert refused.outcome == Outcome.NOT_ACTIVE and refused.status == "COMPLETED"


async def test_the_log_shows_messages_and_status_changes_in_order(store: ThreadStorage) -> None:
    await store.create_thread(NewThread("t", "p", "", "", ()))
    start = await store.last_entry("t")
    await store.post(message("t", "operator", "a", 1, agent=False), None)
    await store.end_thread("t", "KILLED", "")
    events = await store.read_log("t", start, 100)
    assert [e.message.payload_json if e.message else e.status for e in events] == [
        '{"n": 1}',
        "KILLED",
    ]


async def test_an_inbox_delivers_counts_acks_and_hands_over(store: ThreadStorage) -> None:
    await store.create_thread(NewThread("t", "p", "", "", ()))
    await store.ensure_group("p", "b")
    await store.ensure_group("p", "b")  # idempotent
    for n in (1, 2):
        await store.post(message("t", "a", "b", n), None)
    first = await store.deliveries("p", "b", "c1", False, 100)
    assert [d.message.payload_json for d in first] == ['{"n": 1}', '{"n": 2}']
    assert all(d.count == 1 and d.message.thread_id == "t" for d in first)
    again = await store.deliveries("p", "b", "c1", True, 0)  # unacknowledged: delivered again
    assert [d.ack_id for d in again] == [d.ack_id for d in first] and again[0].count == 2
    assert await store.ack("p", "b", [first[0].ack_id]) == 1
    assert await store.ack("p", "b", [first[0].ack_id]) == 0
    moved = await store.claim_idle("p", "b", "c2", 0)  # c1 vanished: c2 takes what it left
    assert [d.ack_id for d in moved] == [first[1].ack_id]
    assert await store.deliveries("p", "b", "c1", True, 0) == []

    assert await store.acquire_lease("p", "b", "c1", "tok-1", 5000)
    assert not await store.acquire_lease("p", "b", "c1", "tok-2", 5000)
    assert await store.acquire_lease("p", "b", "c1", "tok-1", 5000)  # renewal by its holder
    await store.release_lease("p", "b", "c1", "tok-2")  # not the holder: nothing happens
    assert not await store.acquire_lease("p", "b", "c1", "tok-2", 5000)
    await store.release_lease("p", "b", "c1", "tok-1")
    assert await store.acquire_lease("p", "b", "c1", "tok-2", 5000)
