"""Installation-wide indexes (services/common/installation.py), on the stores themselves,
standalone and on the three-master cluster: `-` listings and counts read them; a write cut
between its project step and its global step is finished by the healer; changes applied
out of order keep the newest; an upgraded installation is indexed once; a retention pass
visits only the projects with items due, and a project queued while a pass looked is kept.
"""

from __future__ import annotations

import pytest

from services.agent_svc.store import AgentChange, AgentStore
from services.common import installation
from services.common.installation import FINAL, Placement
from services.common.partitions import RetentionSweeper
from services.thread_svc.store import Keys, NewThread, ThreadStore
from tests.helpers.servers import store_clients
from tests.thread_svc.test_store_contract import page


@pytest.fixture
async def threads(redis_target):
    async with store_clients("thread_svc", redis_target) as (redis, streams):
        yield ThreadStore(redis, 600, streams)


@pytest.fixture
async def agents(redis_target):
    async with store_clients("agent_svc", redis_target) as (redis, streams):
        yield AgentStore(redis, 600, streams)


async def listed(store: ThreadStore, status: str = "") -> list[str]:
    found, _, total = await store.list_threads("-", "", status, page(100))
    assert total == len(found)
    return [t.id for t in found]


async def test_listings_and_counts_span_the_projects_newest_first(threads) -> None:
    for n in range(6):
        await threads.create_thread(NewThread(f"t{n}", f"proj-{n % 3}", "", "", ("a",)))
    await threads.end_thread("t1", "KILLED", "runaway")
    assert await listed(threads) == ["t5", "t4", "t3", "t2", "t1", "t0"]
    assert await listed(threads, "ACTIVE") == ["t5", "t4", "t3", "t2", "t0"]
    assert await listed(threads, "KILLED") == ["t1"]
    counts = await threads.installation.counts()
    assert counts == {"": 6, "ACTIVE": 5, "COMPLETED": 0, "FAILED": 0, "KILLED": 1}
    first, token, total = await threads.list_threads("-", "", "", page(4))
    rest, end, _ = await threads.list_threads("-", "", "", page(4, token))
    assert [t.id for t in first + rest] == ["t5", "t4", "t3", "t2", "t1", "t0"]
    assert total == 6 and end == ""


async def test_a_write_cut_between_its_steps_is_finished_by_the_healer(
    threads, monkeypatch
) -> None:
    # A replica that dies after its project steps: its global steps never run.
    cut = ThreadStore(threads._redis, 600, threads._streams)

    async def die(placement: Placement, intent: str = "") -> None:
        raise ConnectionError("replica killed between the steps")

    monkeypatch.setattr(cut.installation, "apply", die)
    await threads.create_thread(NewThread("ok", "p1", "", "", ("a",)))
    with pytest.raises(ConnectionError):
        await cut.create_thread(NewThread("cut", "p2", "", "", ("a",)))
    with pytest.raises(ConnectionError):
        await cut.end_thread("ok", "COMPLETED", "")
    assert await listed(threads) == ["ok"]  # the global views lag by the cut writes
    assert await listed(threads, "ACTIVE") == ["ok"]
    assert await threads.installation.heal(threads.placement) == 0  # within their grace
    monkeypatch.setattr(installation, "INTENT_GRACE_MS", 0)
    assert await threads.installation.heal(threads.placement) == 2
    assert await listed(threads) == ["cut", "ok"]
    assert await listed(threads, "ACTIVE") == ["cut"]
    assert await listed(threads, "COMPLETED") == ["ok"]
    assert await threads.installation.heal(threads.placement) == 0  # nothing left over
    # The cut end also queued the thread for removal: its project is due.
    assert await threads.installation.due_projects(2**53) == ["p1"]


async def test_changes_applied_out_of_order_keep_the_newest(agents) -> None:
    await agents.create_project({"id": "p", "display_name": "P", "owner": "o", "create_ms": "1"})
    fields = {"id": "ag", "project_id": "p", "name": "n", "status": "IDLE", "create_ms": "1"}
    await agents.spawn(fields, "")
    for target in ("WORKING", "IDLE", "WORKING"):
        move = AgentChange("ag", target_status=target, allowed_from=("IDLE", "WORKING"))
        await agents.update(move, "p")
    now = await agents.placement("ag")
    assert now == Placement("ag", "WORKING", 3)
    # A slow replica's step for change 1 (WORKING → IDLE was 2) arrives last: ignored.
    await agents.installation.apply(Placement("ag", "IDLE", 2))
    counts = await agents.counters()
    assert counts["n_WORKING"] == 1 and counts["n_IDLE"] == 0 and counts["agents"] == 1
    # A removal outranks every change before it.
    await agents.installation.apply(Placement("ag", "", FINAL))
    counts = await agents.counters()
    assert counts["agents"] == counts["n_WORKING"] == 0


async def test_an_upgraded_installation_is_indexed_once(threads, redis_target) -> None:
    for n in range(5):
        await threads.create_thread(NewThread(f"old{n}", f"proj-{n}", "", "", ("a",)))
    await threads.end_thread("old2", "FAILED", "")
    # The data as the previous version left it: no installation-wide keys at all.
    for key in await _global_keys(threads):
        await threads._redis.delete(key)
    assert await listed(threads) == []
    assert await threads.installation.build(threads.every_thread(), threads.placement) == 5
    assert await listed(threads) == ["old4", "old3", "old2", "old1", "old0"]
    assert await listed(threads, "FAILED") == ["old2"]
    assert await threads.installation.due_projects(2**53) == ["proj-2"]
    assert await threads.installation.build(threads.every_thread(), threads.placement) == 0


async def _global_keys(store: ThreadStore) -> list[str]:
    g = store.installation
    return [g.index(s) for s in ("", "ACTIVE", "COMPLETED", "FAILED", "KILLED")] + [
        g.due_key,
        f"{g.prefix}seq",
        f"{g.prefix}marks",
        f"{g.prefix}built",
    ]


async def test_a_retention_pass_visits_only_the_projects_with_items_due(threads) -> None:
    visited: list[str] = []

    class Counting(RetentionSweeper):
        async def _sweep_one(self, partition, stopping):  # type: ignore[no-untyped-def]
            visited.append(partition)
            return await super()._sweep_one(partition, stopping)

    for n in range(200):
        await threads.create_thread(NewThread(f"t{n}", f"proj-{n}", "", "", ("a",)))
    for n in (7, 42):
        await threads.end_thread(f"t{n}", "COMPLETED", "")
    sweeper = Counting(threads._redis, threads, 0.0, "threads", due=threads.installation)
    assert await sweeper.sweep() == 2
    assert sorted(visited) == ["proj-42", "proj-7"]
    visited.clear()
    assert await sweeper.sweep() == 0 and visited == []  # settled: nothing due any more
    assert await threads.installation.due_projects(2**53) == []


async def test_a_project_queued_while_a_pass_looked_stays_due(threads) -> None:
    await threads.create_thread(NewThread("first", "p", "", "", ("a",)))
    await threads.end_thread("first", "COMPLETED", "")
    g = threads.installation
    marks = await g.mark_count("p")
    await threads._redis.delete(Keys("p").ended)  # the pass found the queue empty...
    await threads.create_thread(NewThread("second", "p", "", "", ("a",)))
    await threads.end_thread("second", "COMPLETED", "")  # ...and a thread ended meanwhile
    await g.settle("p", marks, None)
    assert await g.due_projects(2**53) == ["p"]
    await g.settle("p", await g.mark_count("p"), None)  # nothing since: dropped
    assert await g.due_projects(2**53) == []
