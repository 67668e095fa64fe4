"""Redis storage of usage counters, thread budgets and reservations.

Keys are spread over `shards` hash tags, `ap:usage:{uN}:`, chosen by the thread id
(crc32). Everything one record touches — its idempotency key, the thread's budget and
reservations, and the shard's cluster/agent/model/project aggregates — shares that tag, so
each write is one atomic Lua script in one slot, and a Redis Cluster spreads the shards
over its masters. Reads sum the shards: their cost depends on the shard count, never on
the number of threads.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.common import tuning
from services.common.convert import now_ms
from services.common.pagination import Page
from services.common.redis import RedisClient, load_script

PREFIX = "ap:usage:"
LUA = Path(__file__).with_name("lua")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One checked record, with its cost already resolved."""

    usage_id: str
    thread_id: str
    agent_id: str
    project_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    latency_ms: int
    unpriced: bool
    reservation_id: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class BudgetState:
    thread_id: str
    has_budget: bool
    max_tokens: int
    prompt_tokens: int
    completion_tokens: int
    reserved_tokens: int
    closed: bool
    update_ms: int

    @classmethod
    def from_reply(cls, thread_id: str, values: Sequence[int]) -> BudgetState:
        has, max_tokens, prompt, completion, reserved, closed, update_ms = (int(v) for v in values)
        return cls(
            thread_id, bool(has), max_tokens, prompt, completion, reserved, bool(closed), update_ms
        )


class Outcome(enum.StrEnum):
    """What a write script answered (the same words as the Lua scripts return)."""

    NEW = "NEW"  # a record counted for the first time
    DUPLICATE = "DUPLICATE"  # a record seen before: counted once, first answer again
    CONFLICT = "CONFLICT"  # a usage or reservation id seen before with another body
    FOREIGN = "FOREIGN"  # the thread's budget belongs to another project
    OK = "OK"
    NO_BUDGET = "NO_BUDGET"
    CLOSED = "CLOSED"  # the thread's budget is closed: no new reservations
    EXHAUSTED = "EXHAUSTED"  # the reservation does not fit in the budget


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    outcome: Outcome  # NEW | DUPLICATE | CONFLICT | FOREIGN
    cost_micros: int = 0
    budget: BudgetState | None = None


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """The answer of a budget write (reserve, release, close)."""

    outcome: Outcome
    state: BudgetState
    expire_ms: int = 0  # reserve: when the hold lapses
    released: bool = False  # release: whether a live reservation was given back


@dataclass(slots=True)
class Counters:
    prompt: int = 0
    completion: int = 0
    requests: int = 0
    cost_micros: int = 0
    latency_sum_ms: int = 0
    unpriced: int = 0

    def add(self, raw: dict[str, str]) -> Counters:
        self.prompt += int(raw.get("p", 0))
        self.completion += int(raw.get("c", 0))
        self.requests += int(raw.get("n", 0))
        self.cost_micros += int(raw.get("cost", 0))
        self.latency_sum_ms += int(raw.get("lat", 0))
        self.unpriced += int(raw.get("unp", 0))
        return self


@dataclass(slots=True)
class Overview:
    totals: Counters
    by_agent: list[tuple[str, Counters]] = field(default_factory=list)
    by_model: list[tuple[str, Counters]] = field(default_factory=list)
    active_threads: int = 0


class Shard:
    """Key names within one shard."""

    def __init__(self, index: int) -> None:
        self.prefix = f"{PREFIX}{{u{index}}}:"
        self.totals = self.prefix + "totals"
        self.stats = self.prefix + "stats"
        self.budgets = self.prefix + "budgets"
        self.agents_rank = self.prefix + "rank:agents"
        self.models_rank = self.prefix + "rank:models"

    def thread(self, thread_id: str) -> tuple[str, str, str]:
        """The thread's hash, reservations hash and reservation expiries."""
        base = f"{self.prefix}thread:{thread_id}"
        return base, base + ":res", base + ":exp"

    def usage_id(self, thread_id: str, usage_id: str) -> str:
        return f"{self.prefix}usage:{thread_id}:{usage_id}"

    def agent(self, agent_id: str) -> str:
        return f"{self.prefix}agent:{agent_id}"

    def model(self, model: str) -> str:
        return f"{self.prefix}model:{model}"

    def project_totals(self, project_id: str) -> str:
        return f"{self.prefix}project:{project_id}:totals"

    def project_agents_rank(self, project_id: str) -> str:
        return f"{self.prefix}project:{project_id}:rank:agents"


class UsageStore:
    def __init__(self, redis: RedisClient, shards: int, usage_id_ttl_s: int) -> None:
        self._redis = redis
        self._shards = [Shard(i) for i in range(shards)]
        self._ttl = usage_id_ttl_s
        self._pending: list[tuple[UsageRecord, asyncio.Future[RecordOutcome]]] = []
        self._writer: asyncio.Future[None] | None = None
        prelude = LUA / "_budget.lua"
        self._record = load_script(redis, LUA / "record_usage.lua", prelude)
        self._reserve = load_script(redis, LUA / "reserve.lua", prelude)
        self._release = load_script(redis, LUA / "release.lua", prelude)
        self._set_budget = load_script(redis, LUA / "set_budget.lua", prelude)
        self._close_budget = load_script(redis, LUA / "close_budget.lua", prelude)

    def shard(self, thread_id: str) -> Shard:
        return self._shards[zlib.crc32(thread_id.encode()) % len(self._shards)]

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
        groups: dict[int, list[int]] = {}
        for position, record in enumerate(records):
            groups.setdefault(id(self.shard(record.thread_id)), []).append(position)
        calls = [
            self._record_call([records[p] for p in positions]) for positions in groups.values()
        ]
        if len(calls) == 1:
            replies = [await self._record(keys=calls[0][0], args=calls[0][1])]
        else:  # shards are independent slots: their scripts run concurrently
            replies = await asyncio.gather(*(self._record(keys=k, args=v) for k, v in calls))
        outcomes: list[RecordOutcome | None] = [None] * len(records)
        for positions, reply in zip(groups.values(), replies, strict=True):
            for position, item in zip(positions, reply, strict=True):
                outcomes[position] = _outcome(records[position].thread_id, item)
        return outcomes  # type: ignore[return-value]

    def _record_call(self, records: Sequence[UsageRecord]) -> tuple[list[str], list[object]]:
        keys: list[str] = []
        args: list[object] = [now_ms(), self._ttl]
        for r in records:
            shard = self.shard(r.thread_id)
            thread, reservations, expiries = shard.thread(r.thread_id)
            project = r.project_id or "-"
            keys += [
                shard.usage_id(r.thread_id, r.usage_id), thread, reservations, expiries,
                shard.budgets, shard.totals, shard.agent(r.agent_id), shard.model(r.model),
                shard.agents_rank, shard.models_rank, shard.project_totals(project),
                shard.project_agents_rank(project),
            ]  # fmt: skip
            args.append(
                f"{r.fingerprint}|{r.prompt_tokens}|{r.completion_tokens}|{r.cost_micros}|"
                f"{r.latency_ms}|{int(r.unpriced)}|{r.reservation_id}|{r.agent_id}|{r.model}|"
                f"{r.thread_id}|{int(bool(r.project_id))}|{r.project_id}"
            )
        return keys, args

    async def reserve(
        self, thread_id: str, reservation_id: str, tokens: int, ttl_ms: int
    ) -> BudgetChange:
        """OK | NO_BUDGET | CLOSED | EXHAUSTED | CONFLICT."""
        now = now_ms()
        reply = await self._reserve(
            keys=list(self.shard(thread_id).thread(thread_id)),
            args=[reservation_id, tokens, now, now + ttl_ms],
        )
        outcome, value, state = _budget_reply(thread_id, reply)
        return BudgetChange(outcome, state, expire_ms=value)

    async def release(self, thread_id: str, reservation_id: str) -> BudgetChange:
        """OK | NO_BUDGET."""
        reply = await self._release(
            keys=list(self.shard(thread_id).thread(thread_id)), args=[reservation_id, now_ms()]
        )
        outcome, value, state = _budget_reply(thread_id, reply)
        return BudgetChange(outcome, state, released=bool(value))

    async def set_budget(
        self, thread_id: str, max_tokens: int, project_id: str, create: bool
    ) -> BudgetState | None:
        """The budget after setting it; None when it belongs to another project, or when
        there is none and `create` is false."""
        shard = self.shard(thread_id)
        thread, reservations, expiries = shard.thread(thread_id)
        reply = await self._set_budget(
            keys=[thread, shard.budgets, shard.stats, reservations, expiries],
            args=[max_tokens, now_ms(), thread_id, project_id, "1" if create else "0"],
        )
        if reply[0] in (Outcome.FOREIGN, Outcome.NO_BUDGET):
            return None
        return _budget_reply(thread_id, reply)[2]

    async def budget_project(self, thread_id: str) -> tuple[bool, str]:
        """(whether the thread has a budget, the project it belongs to or "")."""
        thread, _, _ = self.shard(thread_id).thread(thread_id)
        max_tokens, project_id = await self._redis.hmget(thread, "max_tokens", "project_id")
        return max_tokens is not None, project_id or ""

    async def close_budget(self, thread_id: str) -> BudgetChange:
        """OK | NO_BUDGET."""
        shard = self.shard(thread_id)
        thread, reservations, expiries = shard.thread(thread_id)
        reply = await self._close_budget(
            keys=[thread, shard.stats, reservations, expiries], args=[now_ms()]
        )
        outcome, _, state = _budget_reply(thread_id, reply)
        return BudgetChange(outcome, state)

    async def reset(self) -> int:
        """Delete every usage key (admin only). Scans: a rare, deliberate operation."""
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
        """Budgets of the threads (None where there is none), in one round trip.

        A pure read: reservations whose ttl has passed are left out of `reserved` here and
        given back by the next write to that thread.
        """
        now = now_ms()
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id in thread_ids:
                thread, reservations, expiries = self.shard(thread_id).thread(thread_id)
                pipe.hmget(thread, "max_tokens", "p", "c", "reserved", "closed", "update_ms")
                pipe.hgetall(reservations)
                pipe.zrangebyscore(expiries, "-inf", now)
            replies = await pipe.execute()
        states: list[BudgetState | None] = []
        for position, thread_id in enumerate(thread_ids):
            fields, held, expired = replies[3 * position : 3 * position + 3]
            if fields[0] is None:
                states.append(None)
                continue
            lapsed = sum(int(held.get(rid, 0)) for rid in expired)
            max_tokens, prompt, completion, reserved, closed, update_ms = (
                int(v or 0) for v in fields
            )
            states.append(
                BudgetState(thread_id, True, max_tokens, prompt, completion,
                            reserved - lapsed, bool(closed), update_ms)
            )  # fmt: skip
        return states

    async def hottest_budgets(self, page: Page) -> tuple[list[BudgetState], str, int]:
        """One page of budgets, hottest first: (budgets, next page token, total).

        The ranking changes as usage arrives, so the cursor is a position."""
        offset = (int(page.cursor) if page.cursor and page.cursor.isdigit() else 0) + page.skip
        thread_ids, total = await self.hottest(offset, page.size)
        states = await self.budgets(thread_ids)
        end = offset + len(thread_ids)
        token = page.token_after(str(end)) if end < total else ""
        return [s for s in states if s is not None], token, total

    async def hottest(self, offset: int, size: int) -> tuple[list[str], int]:
        """Thread ids of one page of budgets, hottest first, and the number of budgets.

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
        return (await self._sum_each([[s.agent(agent_id) for s in self._shards]]))[0]

    async def model_counters(self, model: str) -> Counters:
        return (await self._sum_each([[s.model(model) for s in self._shards]]))[0]

    async def overview(self, project_id: str, top: int) -> Overview:
        """Totals, top agents and models by tokens, and active budgets; all from shard
        aggregates. With a project: its totals and agents (models are cluster-wide)."""
        agents, models, active = await self._ranked(project_id, top)
        if project_id:
            models, active = [], 0
            totals_keys = [s.project_totals(project_id) for s in self._shards]
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

    async def _ranked(self, project_id: str, top: int) -> tuple[list[str], list[str], int]:
        """The top agents (of the project, if one is given) and models by tokens, and the
        number of active budgets, merged over the shards in one round trip."""
        agent_ranks = [
            s.project_agents_rank(project_id) if project_id else s.agents_rank for s in self._shards
        ]
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in agent_ranks:
                pipe.zrevrange(key, 0, top - 1, withscores=True)
            for shard in self._shards:
                pipe.zrevrange(shard.models_rank, 0, top - 1, withscores=True)
                pipe.hget(shard.stats, "active")
            replies = await pipe.execute()
        n = len(self._shards)
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


def _top(ranked_per_shard: Sequence[Sequence[tuple[str, float]]], top: int) -> list[str]:
    totals: dict[str, float] = {}
    for ranked in ranked_per_shard:
        for member, score in ranked:
            totals[member] = totals.get(member, 0.0) + score
    return [m for m, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _outcome(thread_id: str, item: Sequence[object]) -> RecordOutcome:
    outcome = Outcome(str(item[0]))
    if outcome in (Outcome.CONFLICT, Outcome.FOREIGN):
        return RecordOutcome(outcome)
    budget = BudgetState.from_reply(thread_id, item[2:9])  # type: ignore[arg-type]
    return RecordOutcome(outcome, int(item[1]), budget if budget.has_budget else None)  # type: ignore[call-overload]


def _budget_reply(thread_id: str, reply: Sequence[object]) -> tuple[Outcome, int, BudgetState]:
    outcome, value = Outcome(str(reply[0])), int(reply[1])  # type: ignore[call-overload]
    values = reply[2:9] if len(reply) >= 9 else [0] * 7
    return outcome, value, BudgetState.from_reply(thread_id, values)  # type: ignore[arg-type]


class UsageStorage(Protocol):
    """What the usage service needs from its storage."""

    async def record_one(self, record: UsageRecord) -> RecordOutcome: ...
    async def record(self, records: Sequence[UsageRecord]) -> list[RecordOutcome]: ...
    async def reserve(
        self, thread_id: str, reservation_id: str, tokens: int, ttl_ms: int
    ) -> BudgetChange: ...
    async def release(self, thread_id: str, reservation_id: str) -> BudgetChange: ...
    async def set_budget(
        self, thread_id: str, max_tokens: int, project_id: str, create: bool
    ) -> BudgetState | None: ...
    async def budget_project(self, thread_id: str) -> tuple[bool, str]: ...
    async def close_budget(self, thread_id: str) -> BudgetChange: ...
    async def reset(self) -> int: ...
    async def budgets(self, thread_ids: Sequence[str]) -> list[BudgetState | None]: ...
    async def hottest_budgets(self, page: Page) -> tuple[list[BudgetState], str, int]: ...
    async def agent_counters(self, agent_id: str) -> Counters: ...
    async def model_counters(self, model: str) -> Counters: ...
    async def overview(self, project_id: str, top: int) -> Overview: ...


_: type[UsageStorage] = UsageStore  # the store keeps to its interface (checked by mypy)
