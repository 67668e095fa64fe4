"""Redis storage of usage counters, thread budgets and reservations (key layout: keys.py;
the values it reads and writes: usage_types.py).

Every write is one Lua script in one project's partition and its shard, so each is atomic,
also on Redis Cluster. Reads sum the shards: their cost depends on the shard count, never
on the number of threads.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from services.common import tuning
from services.common.convert import now_ms
from services.common.pagination import Page
from services.common.redis import HotScript, RedisClient, load_script
from services.common.resp import PipelinedRedis
from services.usage_svc.keys import PREFIX, Layout, Partition
from services.usage_svc.usage_types import (
    ALL,
    HOUR_MS,
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

LUA = Path(__file__).with_name("lua")


class PeriodOpener(Protocol):
    """Opens the current period of budgets whose period has ended (the budget store)."""

    async def open_periods(self, stale: Sequence[tuple[Partition, str]]) -> None: ...


LUA_PRELUDE = LUA / "_prelude.lua"
ROLL_ATTEMPTS = 4  # a period can end between opening it and retrying only so often
NEGATIVE_CACHE_S = 1.0  # how long the record path trusts "this thread has no budget"
DIRECTORY_CACHE_S = 60.0  # a thread's project only changes when ResetUsage erases all


def script(redis: RedisClient, name: str) -> Any:
    return load_script(redis, LUA / f"{name}.lua", LUA_PRELUDE)


class UsageStore:
    def __init__(
        self,
        redis: RedisClient,
        shards: int,
        usage_id_ttl_s: int,
        periods: PeriodOpener | None = None,
        clock: Clock = now_ms,
        retention_s: tuple[int, int] = (35 * 86_400, 400 * 86_400),
        pipe: PipelinedRedis | None = None,
    ) -> None:
        self._retention = retention_s  # hourly, daily buckets
        self._redis = redis
        self.layout = Layout(shards)
        self._shards = self.layout.shards
        self._ttl = usage_id_ttl_s
        self._clock = clock
        self._periods = periods
        self._directory: dict[str, tuple[str, float]] = {}  # thread id -> (project, until)
        self._no_budget: dict[str, float] = {}  # thread id -> until when "none" is trusted
        self._pending: list[tuple[UsageRecord, asyncio.Future[RecordOutcome]]] = []
        self._writer: asyncio.Future[None] | None = None
        # Recording is idempotent (by usage id): it may take the pipelined connection.
        self._record = HotScript(script(redis, "record_usage"), pipe)
        self._reserve = script(redis, "reserve")
        self._release = script(redis, "release")
        self._set_budget = script(redis, "set_budget")
        self._close_budget = script(redis, "close_budget")
        self._forget_thread = script(redis, "forget_thread")

    # The thread directory -------------------------------------------------------------

    async def thread_project(self, thread_id: str, fresh: bool = True) -> str | None:
        """The project of a thread with a budget, or None without a budget. A thread's
        project is written once, so it is cached (for DIRECTORY_CACHE_S, in case a
        ResetUsage on another replica erased it); with `fresh` false, "no
        budget" may also come from a cache of the last NEGATIVE_CACHE_S."""
        known = self._directory.get(thread_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        if not fresh and self._no_budget.get(thread_id, 0.0) > time.monotonic():
            return None
        found = await self._redis.get(Layout.thread_directory(thread_id))
        if found is not None:
            self._remember(thread_id, found)
        elif not fresh:
            if len(self._no_budget) >= tuning.MAX_CACHED_ENTRIES:
                self._no_budget.clear()
            self._no_budget[thread_id] = time.monotonic() + NEGATIVE_CACHE_S
        return found

    async def _claim_thread(self, thread_id: str, project_id: str) -> str:
        """The thread's project: `project_id` if the thread had none yet, else its own."""
        key = Layout.thread_directory(thread_id)
        if await self._redis.set(key, project_id, nx=True):
            owner = project_id
        else:
            owner = await self._redis.get(key) or ""
        self._remember(thread_id, owner)
        return owner

    def _remember(self, thread_id: str, project_id: str) -> None:
        if len(self._directory) >= tuning.MAX_CACHED_ENTRIES:
            self._directory.clear()
        self._directory[thread_id] = (project_id, time.monotonic() + DIRECTORY_CACHE_S)

    # Writes -------------------------------------------------------------------------

    async def record_one(self, record: UsageRecord) -> RecordOutcome:
        """Apply one record, sharing the script call with records that arrive meanwhile.

        Group commit: one batch is written at a time; records that arrive while it is
        in flight wait for the next one, so under load batches grow by themselves and at
        low load a record is written at once. Each call still gets its own answer.
        """
        waiter: asyncio.Future[RecordOutcome] = asyncio.get_running_loop().create_future()
        self._pending.append((record, waiter))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        return await waiter

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = (
                self._pending[: tuning.MAX_GROUP_COMMIT],
                self._pending[tuning.MAX_GROUP_COMMIT :],
            )
            # A caller that gave up while waiting (its deadline passed) is not written for:
            # no write happens after a handler's deadline.
            batch = [(record, waiter) for record, waiter in batch if not waiter.done()]
            if batch:
                await self._write_batch(batch)

    async def _write_batch(
        self, batch: list[tuple[UsageRecord, asyncio.Future[RecordOutcome]]]
    ) -> None:
        try:
            outcomes = await self.record([record for record, _ in batch])
        except Exception as exc:  # every waiter of the batch sees the failure
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for (_, waiter), outcome in zip(batch, outcomes, strict=True):
            if not waiter.done():  # a waiter past its deadline has been cancelled
                waiter.set_result(outcome)

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
        now = time.monotonic()
        for position, r in enumerate(records):
            known = self._directory.get(r.thread_id)  # the cache, without a coroutine
            if known is not None and known[1] > now:
                owner: str | None = known[0]
            else:
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
            head = [self._clock(), self._ttl, *self._retention]
            reply = await self._record(keys=keys, args=[*head, *fields])
            if not _rolls(reply[0]):
                return list(reply)
            await self._open_periods(reply[0][1:], partitions)
        raise RuntimeError("budget periods kept ending while recording")

    async def _open_periods(self, stale: Sequence[Any], partitions: dict[str, Any]) -> None:
        """Open the periods the script named, as (partition prefix, budget id) pairs; the
        prefixes are those of the partitions this call passed (no key is parsed)."""
        if self._periods is None:
            raise RuntimeError("a budget's period ended but no period opener is configured")
        by_prefix = {p.prefix: p for p in partitions.values()}
        pairs = [
            (by_prefix[str(prefix)], str(bid))
            for prefix, bid in zip(stale[::2], stale[1::2], strict=True)
        ]
        await self._periods.open_periods(pairs)

    async def reserve(self, hold: Hold) -> BudgetChange:
        """OK | NO_BUDGET | CLOSED | EXHAUSTED | CONFLICT."""
        project = await self.thread_project(hold.thread_id)
        if project is None:
            return BudgetChange(Outcome.NO_BUDGET, _empty_state(hold.thread_id))
        partition = self.layout.partition(project)
        for _ in range(ROLL_ATTEMPTS):
            now = self._clock()
            reply = await self._reserve(
                keys=[partition.prefix],
                args=[hold.reservation_id, hold.thread_id, hold.tokens, hold.cost_micros, now,
                      now + hold.ttl_ms, hold.agent_id, hold.model, hold.key_id],
            )  # fmt: skip
            if not _rolls(reply):
                outcome, value, state = _budget_reply(hold.thread_id, reply)
                refused = [str(s) for s in reply[9:]] if outcome == Outcome.EXHAUSTED else []
                return BudgetChange(outcome, state, expire_ms=value, refused=refused)
            await self._open_periods(reply[1:], {project: partition})
        raise RuntimeError("budget periods kept ending while reserving")

    async def release(self, thread_id: str, reservation_id: str) -> BudgetChange:
        """OK | NO_BUDGET."""
        project = await self.thread_project(thread_id)
        if project is None:
            return BudgetChange(Outcome.NO_BUDGET, _empty_state(thread_id))
        reply = await self._release(
            keys=[self.layout.partition(project).prefix],
            args=[reservation_id, thread_id, self._clock()],
        )
        outcome, value, state = _budget_reply(thread_id, reply)
        return BudgetChange(outcome, state, released=bool(value))

    async def set_budget(
        self, thread_id: str, max_tokens: int, project_id: str, create: bool
    ) -> BudgetState | None:
        """The budget after setting it; None when it belongs to another project, or when
        there is none and `create` is false."""
        owner = await self.thread_project(thread_id)
        if owner is None:
            if not create or not project_id:
                return None
            owner = await self._claim_thread(thread_id, project_id)
        self._no_budget.pop(thread_id, None)
        if project_id and owner != project_id:
            return None
        partition = self.layout.partition(owner)
        reply = await self._set_budget(
            keys=[partition.prefix, partition.shard.prefix],
            args=[max_tokens, self._clock(), thread_id, owner, "1" if create else "0"],
        )
        if reply[0] == Outcome.NO_BUDGET:
            return None
        return _budget_reply(thread_id, reply)[2]

    async def budget_project(self, thread_id: str) -> tuple[bool, str]:
        """(whether the thread has a budget, the project it belongs to or "")."""
        project = await self.thread_project(thread_id)
        return project is not None, project or ""

    async def close_budget(self, thread_id: str) -> BudgetChange:
        """OK | NO_BUDGET."""
        project = await self.thread_project(thread_id)
        if project is None:
            return BudgetChange(Outcome.NO_BUDGET, _empty_state(thread_id))
        partition = self.layout.partition(project)
        reply = await self._close_budget(
            keys=[partition.prefix, partition.shard.prefix], args=[thread_id, self._clock()]
        )
        outcome, _, state = _budget_reply(thread_id, reply)
        return BudgetChange(outcome, state)

    # Retention: closed thread budgets, per shard (a `Removable` for the sweeper) -------

    def removal_queue(self, shard: str) -> str:
        return self._shards[int(shard)].closed

    async def partitions(self) -> AsyncIterator[list[str]]:
        """The sweeper walks the shards (each has one queue of closed budgets)."""
        yield [str(i) for i in range(len(self._shards))]

    async def remove(self, shard: str, member: str) -> bool:
        """Remove a closed thread budget after THREAD_RETENTION (False: not closed)."""
        thread_id, _, project_id = member.rpartition("|")
        partition = self.layout.partition(project_id)
        outcome = await self._forget_thread(
            keys=[partition.prefix, partition.shard.prefix],
            args=[member, self._clock(), thread_id],
        )
        if outcome == "OPEN":
            return False
        self._directory.pop(thread_id, None)
        if await self._redis.get(Layout.thread_directory(thread_id)) == project_id:
            await self._redis.delete(Layout.thread_directory(thread_id))
        await self._redis.zrem(partition.shard.closed, member)
        return True

    async def reset(self) -> int:
        """Delete every usage key (admin only). Scans: a rare, deliberate operation."""
        self._directory.clear()
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

    # Reads --------------------------------------------------------------------------

    async def budgets(self, thread_ids: Sequence[str]) -> list[BudgetState | None]:
        """Budgets of the threads (None where there is none)."""
        projects = [await self.thread_project(t) for t in thread_ids]
        return await self._budgets(list(zip(thread_ids, projects, strict=True)))

    async def _budgets(self, threads: Sequence[tuple[str, str | None]]) -> list[BudgetState | None]:
        """Budgets of (thread, project) pairs, in one round trip (two when reservations
        have lapsed). A pure read: reservations whose ttl has passed are left out of
        `reserved` here and given back by the next write in the project."""
        now = self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id, project in threads:
                partition = self.layout.partition(project or "")
                pipe.hmget(
                    partition.thread(thread_id),
                    "max_tokens", "p", "c", "reserved", "closed", "update_ms",
                )  # fmt: skip
                pipe.zrangebyscore(partition.resexp, "-inf", now, start=0, num=200)
            replies = await pipe.execute()
        lapsed = await self._lapsed(threads, replies[1::2])
        states: list[BudgetState | None] = []
        for position, ((thread_id, project), fields) in enumerate(
            zip(threads, replies[0::2], strict=True)
        ):
            if project is None or fields[0] is None:
                states.append(None)
                continue
            max_tokens, prompt, completion, reserved, closed, update_ms = (
                int(v or 0) for v in fields
            )
            states.append(
                BudgetState(thread_id, True, max_tokens, prompt, completion,
                            reserved - lapsed[position], bool(closed), update_ms)
            )  # fmt: skip
        return states

    async def _lapsed(
        self, threads: Sequence[tuple[str, str | None]], expired: Sequence[list[str]]
    ) -> list[int]:
        """Tokens of each thread's reservations whose ttl has passed."""
        wanted = [
            [f for f in fields if f.split("|", 1)[0] == thread_id]
            for (thread_id, _), fields in zip(threads, expired, strict=True)
        ]
        if not any(wanted):
            return [0] * len(threads)
        async with self._redis.pipeline(transaction=False) as pipe:
            for (_, project), fields in zip(threads, wanted, strict=True):
                if fields:
                    pipe.hmget(self.layout.partition(project or "").res, fields)
            held = iter(await pipe.execute())
        return [
            sum(int((e or "0").split("|", 1)[0]) for e in next(held)) if fields else 0
            for fields in wanted
        ]

    async def hottest_budgets(self, page: Page) -> tuple[list[BudgetState], str, int]:
        """One page of budgets, hottest first: (budgets, next page token, total).

        The ranking changes as usage arrives, so the cursor is a position."""
        offset = (int(page.cursor) if page.cursor and page.cursor.isdigit() else 0) + page.skip
        members, total = await self.hottest(offset, page.size)
        threads = [_thread_and_project(m) for m in members]
        states = await self._budgets(threads)
        end = offset + len(members)
        token = page.token_after(str(end)) if end < total else ""
        return [s for s in states if s is not None], token, total

    async def hottest(self, offset: int, size: int) -> tuple[list[str], int]:
        """Members ("<thread>|<project>") of one page of budgets, hottest first, and the
        number of budgets.

        Each shard's sorted set is read from the top for offset + size entries and merged,
        so the first page costs the same at any number of threads.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.zrevrange(shard.budgets, 0, offset + size - 1, withscores=True)
                pipe.zcard(shard.budgets)
            replies = await pipe.execute()
        ranked = heapq.merge(
            *replies[0::2], key=lambda member_score: (-member_score[1], member_score[0])
        )
        page = [member for member, _ in ranked][offset : offset + size]
        return page, sum(replies[1::2])

    async def agent_counters(self, agent_id: str) -> Counters:
        return (await self.agents_counters([agent_id]))[0]

    async def agents_counters(self, agent_ids: Sequence[str]) -> list[Counters]:
        """Each agent's totals over the shards, in one round trip."""
        return await self._sum_each([[s.agent(a) for s in self._shards] for a in agent_ids])

    async def model_counters(self, model: str) -> Counters:
        return (await self._sum_each([[s.model(model) for s in self._shards]]))[0]

    async def overview(self, project_id: str, top: int) -> Overview:
        """Totals, top agents and models by tokens, and active budgets; all from shard
        aggregates. With a project: its totals, agents and active budgets (models are
        cluster-wide)."""
        agents, models, active = await self._ranked(project_id, top)
        if project_id:
            models = []
            active = int(await self._redis.get(self.layout.partition(project_id).active) or 0)
            totals_keys = [self.layout.partition(project_id).totals]
        else:
            totals_keys = [s.totals for s in self._shards]
        groups = [totals_keys]
        groups += [[s.agent(a) for s in self._shards] for a in agents]
        groups += [[s.model(m) for s in self._shards] for m in models]
        sums = await self._sum_each(groups)
        return Overview(
            totals=sums[0],
            by_agent=list(zip(agents, sums[1 : 1 + len(agents)], strict=True)),
            by_model=list(zip(models, sums[1 + len(agents) :], strict=True)),
            active_threads=active,
        )

    async def time_series(self, query: SeriesQuery) -> list[tuple[int, str, Counters]]:
        """(bucket start ms, group, counters) of the buckets with usage, oldest first then
        by group: one read per bucket (per shard for the whole installation), never a scan
        of records."""
        starts = list(range(query.start_ms, query.end_ms, query.step_ms))
        if query.project_id == ALL:
            prefixes = [shard.prefix for shard in self._shards]
        else:
            prefixes = [self.layout.partition(query.project_id).prefix]
        letter = "h" if query.step_ms == HOUR_MS else "d"
        wanted = query.field()
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in starts:
                for prefix in prefixes:
                    key = f"{prefix}ts:{letter}:{start}"
                    if wanted:
                        pipe.hget(key, wanted)
                    else:
                        pipe.hgetall(key)
            replies = iter(await pipe.execute())
        series: list[tuple[int, str, Counters]] = []
        for start in starts:
            groups: dict[str, Counters] = {}
            for _ in prefixes:
                reply = next(replies)
                _add_bucket(groups, query, {wanted: reply} if wanted else reply)
            series += [(start, group, groups[group]) for group in sorted(groups)]
        return series

    async def _ranked(self, project_id: str, top: int) -> tuple[list[str], list[str], int]:
        """The top agents (of the project, if one is given) and models by tokens, and the
        number of active budgets, merged over the shards in one round trip."""
        agent_ranks = (
            [self.layout.partition(project_id).agents_rank]
            if project_id
            else [s.agents_rank for s in self._shards]
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in agent_ranks:
                pipe.zrevrange(key, 0, top - 1, withscores=True)
            for shard in self._shards:
                pipe.zrevrange(shard.models_rank, 0, top - 1, withscores=True)
                pipe.hget(shard.stats, "active")
            replies = await pipe.execute()
        n = len(agent_ranks)
        active = sum(int(v or 0) for v in replies[n + 1 :: 2])
        return _top(replies[:n], top), _top(replies[n::2], top), active

    async def _sum_each(self, key_groups: Iterable[Sequence[str]]) -> list[Counters]:
        groups = list(key_groups)
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys in groups:
                for key in keys:
                    pipe.hgetall(key)
            raw = await pipe.execute()
        sums, position = [], 0
        for keys in groups:
            total = Counters()
            for item in raw[position : position + len(keys)]:
                total.add(item)
            sums.append(total)
            position += len(keys)
        return sums


def _add_bucket(groups: dict[str, Counters], query: SeriesQuery, items: dict[str, Any]) -> None:
    """One bucket hash's fields (or the one field asked for) added to their groups."""
    for name, packed in items.items():
        group = query.group_of(name)
        if packed is not None and group is not None:
            groups.setdefault(group, Counters()).add_bucket(packed)


def _top(ranked_per_shard: Sequence[Sequence[tuple[str, float]]], top: int) -> list[str]:
    totals: dict[str, float] = {}
    for ranked in ranked_per_shard:
        for member, score in ranked:
            totals[member] = totals.get(member, 0.0) + score
    return [m for m, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _rolls(reply: Any) -> bool:
    """Whether a script answered that budget periods must be opened first."""
    return isinstance(reply, list) and bool(reply) and reply[0] == "ROLL"


def _thread_and_project(member: str) -> tuple[str, str | None]:
    thread_id, _, project = member.partition("|")
    return thread_id, project


def _empty_state(thread_id: str) -> BudgetState:
    return BudgetState.from_reply(thread_id, [0] * 7)


_OUTCOMES = {o.value: o for o in Outcome}


def _outcome(thread_id: str, item: Sequence[Any]) -> RecordOutcome:
    outcome = _OUTCOMES[item[0]]
    if outcome == Outcome.CONFLICT:
        return RecordOutcome(outcome)
    if not item[2]:  # no thread budget
        return RecordOutcome(outcome, int(item[1]))
    return RecordOutcome(outcome, int(item[1]), BudgetState.from_reply(thread_id, item[2:9]))


def _budget_reply(thread_id: str, reply: Sequence[object]) -> tuple[Outcome, int, BudgetState]:
    outcome, value = Outcome(str(reply[0])), int(reply[1])  # type: ignore[call-overload]
    values = reply[2:9] if len(reply) >= 9 else [0] * 7
    return outcome, value, BudgetState.from_reply(thread_id, values)  # type: ignore[arg-type]


class UsageStorage(Protocol):
    """What the usage service needs from its storage."""

    async def record_one(self, record: UsageRecord) -> RecordOutcome: ...
    async def record(self, records: Sequence[UsageRecord]) -> list[RecordOutcome]: ...
    async def reserve(self, hold: Hold) -> BudgetChange: ...
    async def release(self, thread_id: str, reservation_id: str) -> BudgetChange: ...
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
