"""Data spread by project, and its removal when its time has come.

The agent and thread services key each project's data under the project's own hash tag,
`ap:<service>:{p:<project>}:`, so a write that touches one project (a spawn, a message
post with its thread, inboxes and indexes) is one Lua script in one slot, and on Redis
Cluster the projects — and their load — spread over every master.

- `Directory`: which project an id (an agent's, a thread's) belongs to, a plain key per
  id (`ap:<service>:at:<id>`), cached per replica: the answer never changes while the
  item lives, and a miss after a removal is re-read once.
- `RetentionSweeper`: every replica runs one; each pass visits the partitions that have
  items due — the projects the service's due index names (`installation.py`: a pass costs
  O(due projects), not O(projects)), or every one of a fixed set (the usage service's
  shards) — and claims the items due in each one's removal queue (a sorted set scored by
  the time the item ended) under a lease (`claim_due.lua`), so replicas share the work
  and an item whose remover died is taken again when its lease runs out. Removal itself
  is the service's, in bounded idempotent steps.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from services.common import tuning
from services.common.convert import now_ms
from services.common.installation import Installation
from services.common.logging import get_logger
from services.common.redis import RedisClient, load_script

log = get_logger("agentplane.retention")

CLAIM = Path(__file__).with_name("lua") / "claim_due.lua"


def project_prefix(service: str, project_id: str) -> str:
    """Every key of one project's data in `service` starts with this (one hash tag)."""
    return f"ap:{service}:{{p:{project_id}}}:"


def directory_key(service: str, item_id: str) -> str:
    return f"ap:{service}:at:{item_id}"


class Directory:
    """id → project, for ids (agents, threads) that callers name without their project."""

    def __init__(self, redis: RedisClient, service: str) -> None:
        self._redis = redis
        self._service = service
        self._cache: dict[str, str] = {}

    def key(self, item_id: str) -> str:
        return directory_key(self._service, item_id)

    async def project_of(self, item_id: str, fresh: bool = False) -> str | None:
        if not fresh and (cached := self._cache.get(item_id)) is not None:
            return cached
        found = await self._redis.get(self.key(item_id))
        if found is None:
            self._cache.pop(item_id, None)
        else:
            self._remember(item_id, found)
        return found

    async def projects_of(self, item_ids: Sequence[str]) -> list[str | None]:
        """Several ids' projects: the cached ones, the rest in one round trip."""
        known = {i: self._cache[i] for i in item_ids if i in self._cache}
        missing = sorted(set(item_ids) - known.keys())
        if missing:
            async with self._redis.pipeline(transaction=False) as pipe:
                for item_id in missing:
                    pipe.get(self.key(item_id))
                found = await pipe.execute()
            for item_id, project_id in zip(missing, found, strict=True):
                if project_id is not None:
                    known[item_id] = project_id
                    self._remember(item_id, project_id)
        return [known.get(i) for i in item_ids]

    async def place(self, item_id: str, project_id: str) -> bool:
        """Record the item's project; False when the id already belongs to another one."""
        if not await self._redis.set(self.key(item_id), project_id, nx=True):
            if await self._redis.get(self.key(item_id)) != project_id:
                return False
        self._remember(item_id, project_id)
        return True

    async def forget(self, item_id: str) -> None:
        self._cache.pop(item_id, None)
        await self._redis.delete(self.key(item_id))

    def _remember(self, item_id: str, project_id: str) -> None:
        if len(self._cache) >= tuning.MAX_CACHED_ENTRIES:
            self._cache.clear()
        self._cache[item_id] = project_id


class Removable(Protocol):
    """A store whose items leave after a retention time (see `RetentionSweeper`): its
    data is split in partitions (projects; the usage service's shards), each with one
    removal queue."""

    def removal_queue(self, partition: str) -> str: ...
    def partitions(self) -> AsyncIterator[list[str]]: ...
    async def remove(self, partition: str, item_id: str) -> bool: ...


class RetentionSweeper:
    """Removes what a store's removal queues say is due, on any number of replicas."""

    def __init__(
        self,
        redis: RedisClient,
        store: Removable,
        retention_s: float,
        what: str,
        due: Installation | None = None,
    ) -> None:
        self._redis = redis
        self._store = store
        self._retention_ms = int(retention_s * 1000)
        self._what = what
        self._due = due  # None: every partition, every pass
        self._claim = load_script(redis, CLAIM)

    async def sweep(self, stopping: asyncio.Event | None = None) -> int:
        """One pass over the partitions with items due (until `stopping` is set): how many
        items were removed."""
        if self._due is not None:
            return await self._sweep_due(self._due, stopping)
        removed = 0
        async for chunk in self._store.partitions():
            for partition in chunk:
                removed += await self._sweep_one(partition, stopping)
        return removed

    async def _sweep_due(self, due: Installation, stopping: asyncio.Event | None) -> int:
        """The projects the due index names, each settled after its pass (see
        `Installation.settle`); a project is visited once per pass."""
        removed, seen = 0, set[str]()
        while fresh := [
            p for p in await due.due_projects(now_ms() - self._retention_ms) if p not in seen
        ]:
            for project in fresh:
                if stopping and stopping.is_set():
                    return removed
                seen.add(project)
                marks = await due.mark_count(project)
                removed += await self._sweep_one(project, stopping)
                first = await self._redis.zrange(
                    self._store.removal_queue(project), 0, 0, withscores=True
                )
                await due.settle(project, marks, int(first[0][1]) if first else None)
        return removed

    async def _sweep_one(self, partition: str, stopping: asyncio.Event | None) -> int:
        removed = 0
        while not (stopping and stopping.is_set()):
            due = await self._claim(
                keys=[self._store.removal_queue(partition)],
                args=[now_ms() - self._retention_ms, tuning.RETENTION_LEASE_MS,
                      tuning.RETENTION_CLAIM],
            )  # fmt: skip
            # A claimed batch is removed concurrently: each removal is a few round trips,
            # bounded work each (the batch is at most RETENTION_CLAIM).
            done = await asyncio.gather(*(self._store.remove(partition, i) for i in due))
            removed += sum(done)
            if len(due) < tuning.RETENTION_CLAIM:
                break
        return removed

    def every(self, interval_s: float) -> Callable[[asyncio.Event], Awaitable[None]]:
        """The sweeping loop, for `Chassis.run_in_background`."""
        return functools.partial(self.run, interval_s=interval_s)

    async def run(self, stopping: asyncio.Event, interval_s: float) -> None:
        """Sweep every `interval_s` until stopping; a failed pass is logged and retried."""
        while not stopping.is_set():
            try:
                removed = await self.sweep(stopping)
                if removed:
                    log.info("retention removed", what=self._what, count=removed)
            except Exception as exc:  # Redis down, a peer away: the next pass tries again
                log.warning("retention pass failed", what=self._what, error=str(exc))
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval_s)
            except TimeoutError:
                pass
