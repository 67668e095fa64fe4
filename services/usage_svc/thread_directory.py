"""Which project each thread budget belongs to (`Layout.thread_directory`), cached per
replica: a thread's project is written once (it only goes when ResetUsage erases all, or
the budget is removed after THREAD_RETENTION), so answers are kept for DIRECTORY_CACHE_S;
the record path may also trust "this thread has no budget" for NEGATIVE_CACHE_S."""

from __future__ import annotations

import time

from services.common import tuning
from services.common.redis import RedisClient
from services.usage_svc.keys import Layout

NEGATIVE_CACHE_S = 1.0  # how long the record path trusts "this thread has no budget"
DIRECTORY_CACHE_S = 60.0  # a thread's project only changes when ResetUsage erases all


class ThreadDirectory:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._known: dict[str, tuple[str, float]] = {}  # thread id -> (project, until)
        self._none: dict[str, float] = {}  # thread id -> until when "none" is trusted

    def cached(self, thread_id: str) -> str | None:
        """The project, if this replica knows it now (no Redis call)."""
        known = self._known.get(thread_id)
        return known[0] if known is not None and known[1] > time.monotonic() else None

    async def project_of(self, thread_id: str, fresh: bool = True) -> str | None:
        """The project of a thread with a budget, or None without a budget; with `fresh`
        false, "no budget" may also come from the last NEGATIVE_CACHE_S."""
        if (known := self.cached(thread_id)) is not None:
            return known
        if not fresh and self._none.get(thread_id, 0.0) > time.monotonic():
            return None
        found = await self._redis.get(Layout.thread_directory(thread_id))
        if found is not None:
            self._remember(thread_id, found)
        elif not fresh:
            if len(self._none) >= tuning.MAX_CACHED_ENTRIES:
                self._none.clear()
            self._none[thread_id] = time.monotonic() + NEGATIVE_CACHE_S
        return found

    async def claim(self, thread_id: str, project_id: str) -> str:
        """The thread's project: `project_id` if the thread had none yet, else its own."""
        key = Layout.thread_directory(thread_id)
        if await self._redis.set(key, project_id, nx=True):
            owner = project_id
        else:
            owner = await self._redis.get(key) or ""
        self._remember(thread_id, owner)
        self._none.pop(thread_id, None)
        return owner

    async def forget(self, thread_id: str, project_id: str) -> None:
        """The thread's budget was removed: its entry goes (if it is still this project's)."""
        self._known.pop(thread_id, None)
        if await self._redis.get(Layout.thread_directory(thread_id)) == project_id:
            await self._redis.delete(Layout.thread_directory(thread_id))

    def clear(self) -> None:
        self._known.clear()
        self._none.clear()

    def _remember(self, thread_id: str, project_id: str) -> None:
        if len(self._known) >= tuning.MAX_CACHED_ENTRIES:
            self._known.clear()
        self._known[thread_id] = (project_id, time.monotonic() + DIRECTORY_CACHE_S)
