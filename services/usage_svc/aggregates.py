"""Reads of the usage counters: an agent's or model's totals, the overview with its top
agents and models, and the time series. Each sums the shards (or reads one project's
partition): the cost depends on the shard count, never on the number of threads or
records."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from services.common.redis import RedisClient
from services.usage_svc.keys import Layout
from services.usage_svc.usage_types import ALL, HOUR_MS, Counters, Overview, SeriesQuery


class Aggregates:
    def __init__(self, redis: RedisClient, layout: Layout) -> None:
        self._redis = redis
        self.layout = layout
        self._shards = layout.shards

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
