"""Installation-wide views of data that lives per project, kept so that the superuser's
listings and counts and the retention passes cost O(page) or O(due projects), never
O(projects).

Agents and threads live under their project's hash tag (`partitions.py`); one project's
write is one script in one slot. Beside the per-project indexes, each service keeps, under
its own global tag:

- `idx:<status>` / `idx:` — every item by status (score 0, members sort by creation
  time), read a page at a time and counted with ZCARD;
- `seq` — the change number each item's entry reflects: an entry only moves forward, so
  two replicas applying changes of one item in either order leave the newer one;
- `due` — the projects whose removal queue has items, scored by the earliest item's time,
  with `marks`, a count of marks per project, so a pass removes a project only when no
  item was queued since it looked;
- `intents` — the writes in flight, scored by their start time.

On Redis Cluster the per-project step and the global one cannot be one atomic step, so
each write goes: intent (global) → the project's script → the global step (which also
drops the intent). A replica that dies between them leaves its intent behind; `heal`
(run by every replica, `run`) finds intents older than `INTENT_GRACE_MS` and re-applies
the item's state as its project's record now says — the same idempotent step — so the
global views return to exact within seconds, and meanwhile can only lag by the writes
that were cut, never drift.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import tuning
from services.common.convert import new_id, now_ms
from services.common.logging import get_logger
from services.common.pagination import Page, read_lex_page
from services.common.redis import RedisClient, load_script

log = get_logger("agentplane.installation")

LUA = Path(__file__).with_name("lua")
FINAL = 2**53 - 1  # the change number of a removal: nothing comes after it
INTENT_GRACE_MS = 30_000  # a write older than this has been cut (Redis calls time out far sooner)


@dataclass(frozen=True, slots=True)
class Placement:
    """An item's state as its project's record says: the global step's input."""

    member: str  # its index member (sorts by creation time)
    status: str  # "" when the item is gone
    seq: int  # grows with every change of status (a removal: FINAL)
    due_project: str = ""  # set when the item now waits in its project's removal queue
    due_ms: int = 0


Resolve = Callable[[str], Awaitable[Placement]]  # item id → its placement now
Work = Callable[[asyncio.Event], Awaitable[None]]


class Installation:
    """The installation-wide indexes and due projects of one service (see the module)."""

    def __init__(self, redis: RedisClient, prefix: str, statuses: Sequence[str]) -> None:
        self._redis = redis
        self.prefix = prefix  # the service's global tag, e.g. "ap:agent:{a}:"
        self._statuses = tuple(statuses)
        self._step = load_script(redis, LUA / "installation_step.lua")
        self._settle = load_script(redis, LUA / "settle_due.lua")

    def index(self, status: str = "") -> str:
        return f"{self.prefix}idx:{status}"

    @property
    def due_key(self) -> str:
        return f"{self.prefix}due"

    # Writes -------------------------------------------------------------------------

    async def intend(self, item_id: str, member: str) -> str:
        """Note a write about to start; its token goes to `apply`."""
        token = f"{new_id()}|{item_id}|{member}"
        await self._redis.zadd(f"{self.prefix}intents", {token: now_ms()})
        return token

    async def apply(self, placement: Placement, intent: str = "") -> None:
        """The global step of a write whose project step is done (idempotent)."""
        await self._step(
            keys=[self.prefix],
            args=[placement.member, placement.status, placement.seq, intent,
                  placement.due_project, placement.due_ms, *self._statuses],
        )  # fmt: skip

    async def heal(self, resolve: Resolve, limit: int = 100) -> int:
        """Finish the writes whose writer died between its steps: how many."""
        stale = await self._redis.zrange(
            f"{self.prefix}intents", "-inf", now_ms() - INTENT_GRACE_MS,
            byscore=True, offset=0, num=limit,
        )  # fmt: skip
        for token in stale:
            _, item_id, member = token.split("|", 2)
            placement = await resolve(item_id)
            if not placement.status:  # gone: its entry goes too
                placement = Placement(member=member, status="", seq=FINAL)
            await self.apply(placement, token)
        return len(stale)

    async def build(self, items: AsyncIterator[list[str]], resolve: Resolve) -> int:
        """Index items written before these indexes existed (an upgraded installation),
        once: `items` yields every item id, a chunk at a time. Idempotent, and safe beside
        live writes (an item's entry only moves forward)."""
        if await self._redis.exists(f"{self.prefix}built"):
            return 0
        count = 0
        async for chunk in items:
            for item_id in chunk:
                placement = await resolve(item_id)
                if placement.status:
                    await self.apply(placement)
                    count += 1
        await self._redis.set(f"{self.prefix}built", now_ms())
        return count

    def keeper(self, items: Callable[[], AsyncIterator[list[str]]], resolve: Resolve) -> Work:
        """The background work of every replica (`Chassis.run_in_background`): `build`
        once, then `heal` every INTENT_GRACE_MS / 3 until stopping."""

        async def keep(stopping: asyncio.Event) -> None:
            built = False
            while not stopping.is_set():
                try:
                    if not built:
                        if indexed := await self.build(items(), resolve):
                            log.info("indexed existing items", prefix=self.prefix, count=indexed)
                        built = True
                    if healed := await self.heal(resolve):
                        log.warning("finished cut writes", prefix=self.prefix, count=healed)
                except Exception as exc:  # Redis away: the next round tries again
                    log.warning("installation indexes", prefix=self.prefix, error=str(exc))
                try:
                    await asyncio.wait_for(stopping.wait(), timeout=INTENT_GRACE_MS / 3000)
                except TimeoutError:
                    pass

        return keep

    # Reads --------------------------------------------------------------------------

    async def page(self, status: str, page: Page) -> tuple[list[str], str, int]:
        """Newest first, every project's: (members, next token, total)."""
        return await read_lex_page(self._redis, self.index(status), page, newest_first=True)

    async def counts(self) -> dict[str, int]:
        """Items by status ("" for all), across every project."""
        names = ("", *self._statuses)
        async with self._redis.pipeline(transaction=False) as pipe:
            for status in names:
                pipe.zcard(self.index(status))
            found = await pipe.execute()
        return {s: int(n) for s, n in zip(names, found, strict=True)}

    # Retention ----------------------------------------------------------------------

    async def due_projects(self, cutoff_ms: int) -> list[str]:
        """Projects whose removal queue may hold an item at or before `cutoff_ms`."""
        found = await self._redis.zrange(
            self.due_key, "-inf", cutoff_ms, byscore=True, offset=0, num=tuning.PROJECTS_CHUNK
        )
        return list(found)

    async def mark_count(self, project_id: str) -> str:
        return str(await self._redis.hget(f"{self.prefix}marks", project_id) or "0")

    async def settle(self, project_id: str, marks_seen: str, earliest_ms: int | None) -> None:
        """After a pass over the project: score it by its earliest queued item, or drop it
        when its queue was empty and nothing was queued since `marks_seen` was read."""
        await self._settle(
            keys=[self.prefix],
            args=[project_id, marks_seen, "" if earliest_ms is None else earliest_ms],
        )
