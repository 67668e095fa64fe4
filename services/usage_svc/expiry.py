"""Reservations whose ttl has passed, handled even when nothing else touches their
project (a caller that died holding them): every usage replica runs `ExpiredHolds.run`.

- Each shard keeps an index of the projects with holds, scored by the earliest expiry
  (written by reserve.lua in the same step as the hold). A pass runs `expire_holds.lua` on
  each project that is due: the holds that lapsed are given back — their budgets, windows
  and in-flight slots freed — and the project is scored by its next expiry or leaves.
- A hold made with `on_expiry = CHARGE` is not just given back: the same step queues it in
  its shard, and the pass records it in full as usage flagged `estimated` (usage id
  `expired-<reservation id>`, so a repeat counts once). The queue is claimed under a lease
  (`RetentionSweeper`), so replicas share it and a charger that dies leaves its claim to
  another when the lease ends. Spending is never undercounted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.common.logging import get_logger
from services.common.partitions import RetentionSweeper
from services.common.redis import RedisClient
from services.usage_svc.store import UsageStore
from services.usage_svc.thread_budgets import script
from services.usage_svc.usage_types import UsageRecord

log = get_logger("agentplane.usage.expiry")
BATCH = 100
UNKNOWN_MODEL = "unknown"  # the model of a charged hold that named none


class ExpiredHolds:
    """A `Removable` over the shards' charge queues, and the pass that fills them."""

    def __init__(self, redis: RedisClient, store: UsageStore) -> None:
        self._redis = redis
        self._store = store
        self._shards = store.layout.shards
        self._expire = script(redis, "expire_holds")
        self._charges = RetentionSweeper(redis, self, 0.0, "expired holds charged")

    async def sweep(self, stopping: asyncio.Event | None = None) -> int:
        """One pass: lapsed holds given back in every due project, then the ones to charge
        recorded. How many were charged."""
        now = self._store.now()
        for shard in self._shards:
            due = await self._redis.zrange(
                shard.expiring, "-inf", now, byscore=True, offset=0, num=BATCH
            )
            for project in due:
                partition = self._store.layout.partition(project)
                await self._expire(keys=[partition.prefix], args=[now, project])
        return await self._charges.sweep(stopping)

    # The charge queues, for the sweeper ---------------------------------------------

    def removal_queue(self, shard: str) -> str:
        return self._shards[int(shard)].charge

    async def partitions(self) -> AsyncIterator[list[str]]:
        yield [str(i) for i in range(len(self._shards))]

    async def remove(self, shard: str, member: str) -> bool:
        """Record one expired hold in full (estimated), then drop it from the queue."""
        queue = self._shards[int(shard)]
        entry = await self._redis.hget(queue.charge_entries, member)
        if entry is not None:
            project, thread_id, reservation_id = member.split("|", 2)
            tokens, cost, _, _, _, _, agent, model, key, _ = entry.split("|")
            usage_id = f"expired-{reservation_id}"
            await self._store.record([UsageRecord(
                usage_id=usage_id, thread_id=thread_id, agent_id=agent, project_id=project,
                model=model or UNKNOWN_MODEL, prompt_tokens=int(tokens), completion_tokens=0,
                cost_micros=int(cost), latency_ms=0, unpriced=False, reservation_id="",
                fingerprint=usage_id, key_id=key, estimated=True,
            )])  # fmt: skip
            log.info("expired hold charged", reservation_id=reservation_id, tokens=tokens)
        await self._redis.hdel(queue.charge_entries, member)
        await self._redis.zrem(queue.charge, member)
        return entry is not None

    async def run(self, stopping: asyncio.Event, interval_s: float) -> None:
        """A pass every `interval_s` until stopping (for `Chassis.run_in_background`)."""
        while not stopping.is_set():
            try:
                await self.sweep(stopping)
            except Exception as exc:  # Redis away: the next pass tries again
                log.warning("expired holds pass failed", error=str(exc))
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval_s)
            except TimeoutError:
                pass
