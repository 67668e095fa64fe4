"""Redis storage of usage: the recording path (key layout: keys.py; the values it reads
and writes: usage_types.py). The store is built in layers, one job per file:
`aggregates.py` reads the counters, `thread_budgets.py` keeps thread budgets and their
reservations, this file records usage (group commit: `group_commit.py`) and erases it.

Every write is one Lua script in one project's partition and its shard, so each is atomic,
also on Redis Cluster. Reads sum the shards: their cost depends on the shard count, never
on the number of threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from services.common.convert import now_ms
from services.common.pagination import Page
from services.common.redis import HotScript, RedisClient
from services.common.resp import PipelinedRedis
from services.usage_svc.call_log import DEFAULT_CALL_LOG, CallLogPolicy
from services.usage_svc.group_commit import GroupCommit
from services.usage_svc.keys import PREFIX, Layout
from services.usage_svc.thread_budgets import (
    ROLL_ATTEMPTS,
    PeriodOpener,
    ThreadBudgets,
    rolls,
    script,
)
from services.usage_svc.usage_types import (
    BudgetChange,
    BudgetState,
    Clock,
    Counters,
    Hold,
    Outcome,
    Overview,
    RecordOutcome,
    SeriesQuery,
    UsageRecord,
    record_fields,
)


class UsageStore(ThreadBudgets):
    def __init__(
        self,
        redis: RedisClient,
        shards: int,
        usage_id_ttl_s: int,
        periods: PeriodOpener | None = None,
        clock: Clock = now_ms,
        retention_s: tuple[int, int] = (35 * 86_400, 400 * 86_400),
        pipe: PipelinedRedis | None = None,
        call_log: CallLogPolicy = DEFAULT_CALL_LOG,
    ) -> None:
        super().__init__(redis, Layout(shards), periods, clock)
        self._call_log = call_log
        self._retention = retention_s  # hourly, daily buckets
        self._ttl = usage_id_ttl_s
        self._commits: GroupCommit[UsageRecord, RecordOutcome] = GroupCommit(
            lambda batch: self.record(batch)  # late-bound: a test may wrap `record`
        )
        # Recording is idempotent (by usage id): it may take the pipelined connection.
        self._record = HotScript(script(redis, "record_usage"), pipe)

    async def record_one(self, record: UsageRecord) -> RecordOutcome:
        """Apply one record, sharing the script call with records that arrive meanwhile
        (group commit). Each call still gets its own answer."""
        return await self._commits.submit(record)

    async def record(self, records: Sequence[UsageRecord]) -> list[RecordOutcome]:
        """Apply records: one script call per shard touched."""
        outcomes: list[RecordOutcome | None] = [None] * len(records)
        projects = await self._route(records, outcomes)
        groups: dict[int, list[int]] = {}
        for position, project in enumerate(projects):
            if outcomes[position] is None:
                groups.setdefault(id(self.layout.shard(project)), []).append(position)
        calls = [[(records[p], projects[p]) for p in positions] for positions in groups.values()]
        if len(calls) == 1:
            replies = [await self._record_shard(calls[0])]
        else:  # shards are independent slots: their scripts run concurrently
            replies = list(await asyncio.gather(*(self._record_shard(c) for c in calls)))
        for positions, reply in zip(groups.values(), replies, strict=True):
            for position, item in zip(positions, reply, strict=True):
                outcomes[position] = _outcome(records[position].thread_id, item)
        return outcomes  # type: ignore[return-value]

    async def _route(
        self, records: Sequence[UsageRecord], outcomes: list[RecordOutcome | None]
    ) -> list[str]:
        """The project each record counts in: its thread's (a record made without a
        project, superuser only, counts in its thread's); one that names another project
        than its thread budget's is FOREIGN (nothing written)."""
        projects: list[str] = []
        for position, r in enumerate(records):
            owner = self.directory.cached(r.thread_id)  # without a coroutine, when known
            if owner is None:
                owner = await self.thread_project(r.thread_id, fresh=False)
            if owner is None or owner == r.project_id:
                projects.append(r.project_id)
            elif r.project_id:
                outcomes[position] = RecordOutcome(Outcome.FOREIGN)
                projects.append(r.project_id)
            else:
                projects.append(owner)
        return projects

    async def _record_shard(self, records: Sequence[tuple[UsageRecord, str]]) -> list[Any]:
        """One script call for records (each with the project it counts in) of one shard;
        opens ended budget periods first."""
        keys: list[str] = []
        fields: list[object] = []
        partitions: dict[str, Any] = {}
        for r, project in records:
            partition = partitions.get(project)
            if partition is None:
                partition = partitions[project] = self.layout.partition(project)
            keys += [partition.prefix, partition.shard.prefix]
            fields.append(record_fields(r, project))
        for _ in range(ROLL_ATTEMPTS):
            now = self._clock()
            head = [now, self._ttl, *self._retention, self._call_log.cutoff(now),
                    self._call_log.most]  # fmt: skip
            reply = await self._record(keys=keys, args=[*head, *fields])
            if not rolls(reply[0]):
                return list(reply)
            await self._open_periods(reply[0][1:], partitions)
        raise RuntimeError("budget periods kept ending while recording")

    async def reset(self) -> int:
        """Delete every usage key (admin only). Scans: a rare, deliberate operation."""
        self.directory.clear()
        deleted = 0
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=PREFIX + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await self._unlink(batch)
                batch = []
        if batch:
            deleted += await self._unlink(batch)
        return deleted

    async def _unlink(self, keys: list[str]) -> int:
        # On a cluster, redis-py splits a multi-key UNLINK by slot.
        return int(await self._redis.unlink(*keys))


_OUTCOMES = {o.value: o for o in Outcome}


def _outcome(thread_id: str, item: Sequence[Any]) -> RecordOutcome:
    outcome = _OUTCOMES[item[0]]
    if outcome == Outcome.CONFLICT:
        return RecordOutcome(outcome)
    if not item[2]:  # no thread budget
        return RecordOutcome(outcome, int(item[1]))
    return RecordOutcome(outcome, int(item[1]), BudgetState.from_reply(thread_id, item[2:9]))


class UsageStorage(Protocol):
    """What the usage service needs from its storage."""

    async def record_one(self, record: UsageRecord) -> RecordOutcome: ...
    async def record(self, records: Sequence[UsageRecord]) -> list[RecordOutcome]: ...
    async def reserve(self, hold: Hold) -> BudgetChange: ...
    async def release(
        self, thread_id: str, reservation_id: str, project_id: str = ""
    ) -> BudgetChange: ...
    async def set_budget(
        self, thread_id: str, max_tokens: int, project_id: str, create: bool
    ) -> BudgetState | None: ...
    async def budget_project(self, thread_id: str) -> tuple[bool, str]: ...
    async def thread_project(self, thread_id: str) -> str | None: ...
    async def close_budget(self, thread_id: str) -> BudgetChange: ...
    async def reset(self) -> int: ...
    async def budgets(self, thread_ids: Sequence[str]) -> list[BudgetState | None]: ...
    async def hottest_budgets(self, page: Page) -> tuple[list[BudgetState], str, int]: ...
    async def agent_counters(self, agent_id: str) -> Counters: ...
    async def agents_counters(self, agent_ids: Sequence[str]) -> list[Counters]: ...
    async def model_counters(self, model: str) -> Counters: ...
    async def overview(self, project_id: str, top: int) -> Overview: ...
    async def time_series(self, query: SeriesQuery) -> list[tuple[int, str, Counters]]: ...


_: type[UsageStorage] = UsageStore  # the store keeps to its interface (checked by mypy)
