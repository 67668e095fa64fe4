"""Thread budgets: setting, closing and reading them, reservations against them and
every HARD budget that covers them, and the removal of closed ones after
THREAD_RETENTION (each shard's queue, for the retention sweeper). Each write is one Lua
script in the thread's project partition (and its shard), atomic also on Redis Cluster."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from services.common.convert import now_ms
from services.common.pagination import Page
from services.common.redis import RedisClient, load_script
from services.usage_svc.aggregates import Aggregates
from services.usage_svc.keys import Layout, Partition
from services.usage_svc.thread_directory import ThreadDirectory
from services.usage_svc.usage_types import (
    BudgetChange,
    BudgetState,
    Clock,
    Hold,
    Outcome,
    Refusal,
)

LUA = Path(__file__).with_name("lua")
LUA_PRELUDE = LUA / "_prelude.lua"
ROLL_ATTEMPTS = 4  # a period can end between opening it and retrying only so often


def script(redis: RedisClient, name: str) -> Any:
    return load_script(redis, LUA / f"{name}.lua", LUA_PRELUDE)


class PeriodOpener(Protocol):
    """Opens the current period of budgets whose period has ended (the budget store)."""

    async def open_periods(self, stale: Sequence[tuple[Partition, str]]) -> None: ...


class ThreadBudgets(Aggregates):
    def __init__(
        self,
        redis: RedisClient,
        layout: Layout,
        periods: PeriodOpener | None = None,
        clock: Clock = now_ms,
    ) -> None:
        super().__init__(redis, layout)
        self._clock = clock
        self._periods = periods
        self.directory = ThreadDirectory(redis)
        self._reserve = script(redis, "reserve")
        self._release = script(redis, "release")
        self._set_budget = script(redis, "set_budget")
        self._close_budget = script(redis, "close_budget")
        self._forget_thread = script(redis, "forget_thread")

    def now(self) -> int:
        """The store's clock (Unix ms)."""
        return self._clock()

    async def thread_project(self, thread_id: str, fresh: bool = True) -> str | None:
        """The project of a thread with a budget, or None (see ThreadDirectory)."""
        return await self.directory.project_of(thread_id, fresh)

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
        """OK | NO_BUDGET (a thread without a budget) | CLOSED | EXHAUSTED | CONFLICT. A
        hold without a thread is covered by its project's budgets alone."""
        project = await self.thread_project(hold.thread_id) if hold.thread_id else hold.project_id
        if project is None:
            return BudgetChange(Outcome.NO_BUDGET, _empty_state(hold.thread_id))
        partition = self.layout.partition(project)
        on_expiry = "CHARGE" if hold.charge_on_expiry else ""
        for _ in range(ROLL_ATTEMPTS):
            now = self._clock()
            reply = await self._reserve(
                keys=[partition.prefix],
                args=[hold.reservation_id, hold.thread_id, hold.tokens, hold.cost_micros, now,
                      now + hold.ttl_ms, hold.agent_id, hold.model, hold.key_id, on_expiry,
                      project, hold.least_tokens],
            )  # fmt: skip
            if not rolls(reply):
                outcome, value, state = _budget_reply(hold.thread_id, reply)
                refused = (
                    [Refusal.from_reply(str(s)) for s in reply[9:]]
                    if outcome == Outcome.EXHAUSTED
                    else []
                )
                held = int(reply[9]) if outcome == Outcome.OK else 0
                return BudgetChange(outcome, state, value, tokens=held, refused=refused)
            await self._open_periods(reply[1:], {project: partition})
        raise RuntimeError("budget periods kept ending while reserving")

    async def release(
        self, thread_id: str, reservation_id: str, project_id: str = ""
    ) -> BudgetChange:
        """OK | NO_BUDGET. Without a thread, `project_id` says where the hold is."""
        project = await self.thread_project(thread_id) if thread_id else project_id
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
            owner = await self.directory.claim(thread_id, project_id)
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
        await self.directory.forget(thread_id, project_id)
        await self._redis.zrem(partition.shard.closed, member)
        return True

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


def rolls(reply: Any) -> bool:
    """Whether a script answered that budget periods must be opened first."""
    return isinstance(reply, list) and bool(reply) and reply[0] == "ROLL"


def _thread_and_project(member: str) -> tuple[str, str | None]:
    thread_id, _, project = member.partition("|")
    return thread_id, project


def _empty_state(thread_id: str) -> BudgetState:
    return BudgetState.from_reply(thread_id, [0] * 7)


def _budget_reply(thread_id: str, reply: Sequence[object]) -> tuple[Outcome, int, BudgetState]:
    outcome, value = Outcome(str(reply[0])), int(reply[1])  # type: ignore[call-overload]
    values = reply[2:9] if len(reply) >= 9 else [0] * 7
    return outcome, value, BudgetState.from_reply(thread_id, values)  # type: ignore[arg-type]
