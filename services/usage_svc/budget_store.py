"""Redis storage of budgets, their periods and alerts, and webhooks with their deliveries.

All of a project's keys live in its partition (keys.py), beside its threads and usage, so
the record script charges every covering budget in the same atomic step. A budget's
period is opened lazily: a write that meets an ended period asks for the new one (which
only Python can compute: time zones), and reads bring budgets to the present first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.convert import now_ms
from services.common.redis import RedisClient
from services.usage_svc.keys import Layout, Partition, Shard
from services.usage_svc.periods import HISTORY, WINDOW_SECONDS, Period, bounds
from services.usage_svc.thread_budgets import script
from services.usage_svc.usage_types import Clock

MAX_BUDGETS_PER_PROJECT = 1000
MAX_BUDGETS_PER_SCOPE_ID = 10  # bounds the work of each record
MAX_WEBHOOKS_PER_PROJECT = 10
EVENT_TYPES = ("budget.alert",)


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A budget's settings."""

    scope: str  # PROJECT | THREAD | AGENT | API_KEY | MODEL
    scope_id: str
    limit_tokens: int
    limit_cost_micros: int
    period: Period
    time_zone: str
    enforcement: str  # HARD | SOFT
    thresholds: tuple[int, ...]
    display_name: str = ""
    limit_requests: int = 0
    max_in_flight: int = 0

    @property
    def window_s(self) -> int:
        """The sliding window's length in seconds; 0 for a calendar period."""
        return WINDOW_SECONDS.get(self.period, 0)

    def fields(self) -> dict[str, str]:
        return {
            "scope": self.scope, "sid": self.scope_id, "lt": str(self.limit_tokens),
            "lc": str(self.limit_cost_micros), "lr": str(self.limit_requests),
            "mif": str(self.max_in_flight), "win": str(self.window_s),
            "period": self.period.value, "tz": self.time_zone,
            "enf": self.enforcement, "th": ",".join(map(str, self.thresholds)),
            "name": self.display_name,
        }  # fmt: skip

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> BudgetSpec:
        return cls(
            scope=f.get("scope", ""), scope_id=f.get("sid", ""),
            limit_tokens=int(f.get("lt", 0)), limit_cost_micros=int(f.get("lc", 0)),
            period=Period(f.get("period", "LIFETIME")), time_zone=f.get("tz", "UTC"),
            enforcement=f.get("enf", "HARD"),
            thresholds=tuple(int(t) for t in f.get("th", "").split(",") if t),
            display_name=f.get("name", ""),
            limit_requests=int(f.get("lr", 0)), max_in_flight=int(f.get("mif", 0)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class BudgetRecord:
    budget_id: str
    project_id: str
    spec: BudgetSpec
    period_start_ms: int
    period_end_ms: int
    used_tokens: int
    used_cost_micros: int
    reserved_tokens: int
    reserved_cost_micros: int
    create_ms: int
    update_ms: int
    reset_ms: int
    reset_by: str
    used_requests: int = 0
    in_flight: int = 0

    @classmethod
    def from_fields(cls, project_id: str, budget_id: str, f: dict[str, str]) -> BudgetRecord:
        """From the budget's hash; a window's figures are its sums over the window (the
        refresh adds them as wU wH wR wUC wHC)."""
        w = "w" if "wU" in f else ""
        return cls(
            budget_id=budget_id, project_id=project_id, spec=BudgetSpec.from_fields(f),
            period_start_ms=int(f.get("ps", 0)), period_end_ms=int(f.get("pe", 0)),
            used_tokens=int(f.get(f"{w}U" if w else "t", 0)),
            used_cost_micros=int(f.get(f"{w}UC" if w else "c", 0)),
            reserved_tokens=int(f.get(f"{w}H" if w else "rt", 0)),
            reserved_cost_micros=int(f.get(f"{w}HC" if w else "rc", 0)),
            create_ms=int(f.get("ct", 0)), update_ms=int(f.get("ut", 0)),
            reset_ms=int(f.get("rs_at", 0)), reset_by=f.get("rs_by", ""),
            used_requests=int(f.get(f"{w}R" if w else "r", 0)),
            in_flight=int(f.get("inf", 0)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    start_ms: int
    end_ms: int
    used_tokens: int
    used_cost_micros: int
    limit_tokens: int
    limit_cost_micros: int


@dataclass(frozen=True, slots=True)
class Alert:
    """A raised alert, as the record script encoded it."""

    alert_id: str
    budget_id: str
    project_id: str
    scope: str
    scope_id: str
    threshold: int
    percent_used: float
    used_tokens: int
    used_cost_micros: int
    period_start_ms: int
    create_ms: int
    entry_id: str = ""  # its place in the project's alert stream

    @classmethod
    def decode(cls, encoded: str, entry_id: str = "") -> Alert:
        a, b, p, scope, sid, th, pct, t, c, ps, ct = encoded.split("|")
        return cls(a, b, p, scope, sid, int(th), float(pct), int(t), int(c), int(ps), int(ct),
                   entry_id)  # fmt: skip


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    webhook_id: str
    project_id: str
    url: str
    event_types: list[str]
    create_ms: int


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    delivery_id: str
    webhook_id: str
    event_id: str
    event_type: str
    status: str  # PENDING | DELIVERED | FAILED
    attempts: int
    last_code: int
    last_error: str
    next_ms: int
    create_ms: int
    update_ms: int


@dataclass(frozen=True, slots=True)
class Claim:
    """One attempt of one delivery, claimed by this replica."""

    shard: Shard
    member: str  # "<project>|<delivery id>"
    attempt: int
    url: str
    secret: str
    event_id: str
    event_type: str
    alert: Alert
    create_ms: int
    previous_secret: str = ""  # the secret before a rotation, while it still signs


@dataclass(slots=True)
class Page:
    items: list[Any] = field(default_factory=list)
    next_offset: int = 0  # 0 at the end
    total: int = 0


class BudgetStore:
    def __init__(self, redis: RedisClient, layout: Layout, clock: Clock = now_ms) -> None:
        self._redis = redis
        self.layout = layout
        self._clock = clock
        self._create = script(redis, "budget_create")
        self._update = script(redis, "budget_update")
        self._delete = script(redis, "budget_delete")
        self._refresh = script(redis, "budget_refresh")
        self._reset = script(redis, "budget_reset")
        self._webhook_put = script(redis, "webhook_put")
        self._claim = script(redis, "delivery_claim")
        self._finish = script(redis, "delivery_finish")

    # Budgets ------------------------------------------------------------------------

    async def create(self, project_id: str, budget_id: str, spec: BudgetSpec) -> str:
        """OK | FULL (the project has the most budgets) | CROWDED (so has the scope id)."""
        now = self._clock()
        start, end = bounds(spec.period, spec.time_zone, now, now)
        fields = {**spec.fields(), "ct": now, "ut": now, "ps": start, "pe": end,
                  "t": 0, "c": 0, "rt": 0, "rc": 0, "fired": ",", "gen": 0}  # fmt: skip
        partition = self.layout.partition(project_id)
        limits = [MAX_BUDGETS_PER_PROJECT, MAX_BUDGETS_PER_SCOPE_ID]
        answer = await self._create(
            keys=[partition.prefix],
            args=[budget_id, spec.scope, spec.scope_id, *limits, *_flat(fields)],
        )
        return str(answer)

    async def get(self, project_id: str, budget_id: str) -> BudgetRecord | None:
        (found,) = await self.current(project_id, [budget_id])
        return found

    async def current(
        self, project_id: str, budget_ids: Sequence[str]
    ) -> list[BudgetRecord | None]:
        """Budgets brought to the present: lapsed reservations given back, and a period
        that has ended closed into the history and the current one opened at zero."""
        if not budget_ids:
            return []
        partition = self.layout.partition(project_id)
        hashes = await self._bring_to_present(partition, budget_ids)
        return [
            BudgetRecord.from_fields(project_id, bid, f) if f else None
            for bid, f in zip(budget_ids, hashes, strict=True)
        ]

    async def _bring_to_present(
        self, partition: Partition, budget_ids: Sequence[str]
    ) -> list[dict[str, str]]:
        now = self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:
            for bid in budget_ids:
                pipe.hmget(partition.budget(bid), "period", "tz", "ct")
            settings = await pipe.execute()
        args: list[object] = [now]
        for bid, (period, tz, created) in zip(budget_ids, settings, strict=True):
            start, end, keep = 0, 0, 0
            if period is not None:
                kind = Period(period)
                start, end = bounds(kind, tz or "UTC", now, int(created or 0))
                keep = HISTORY[kind]
            args += [bid, start, end, keep]
        replies = await self._refresh(keys=[partition.prefix], args=args)
        return [_pairs(flat) for flat in replies]

    async def open_periods(self, stale: Sequence[tuple[Partition, str]]) -> None:
        """Open the current period of the budgets whose period ended."""
        by_partition: dict[str, tuple[Partition, list[str]]] = {}
        for partition, bid in stale:
            by_partition.setdefault(partition.prefix, (partition, []))[1].append(bid)
        for partition, bids in by_partition.values():
            await self._bring_to_present(partition, bids)

    async def list_budgets(
        self, project_id: str, scope: str, scope_id: str, offset: int, size: int
    ) -> Page:
        """Budgets oldest first, optionally of one scope (and scope id)."""
        partition = self.layout.partition(project_id)
        if scope and scope_id:
            listed = await self._redis.hget(partition.cover, f"{scope}|{scope_id}") or ""
            ids = sorted(listed.split())
            total, ids = len(ids), ids[offset : offset + size]
        else:
            key = partition.budgets_of_scope(scope) if scope else partition.budget_list
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrange(key, offset, offset + size - 1)
                pipe.zcard(key)
                ids, total = await pipe.execute()
        records = [r for r in await self.current(project_id, ids) if r is not None]
        end = offset + len(ids)
        return Page(records, end if end < total else 0, int(total))

    async def update(self, project_id: str, budget_id: str, changes: dict[str, str]) -> bool:
        """Change settings (hash fields); False when there is no such budget."""
        if await self.get(project_id, budget_id) is None:  # its period is current first
            return False
        partition = self.layout.partition(project_id)
        answer = await self._update(
            keys=[partition.prefix, partition.shard.prefix],
            args=[budget_id, project_id, self._clock(), *_flat(changes)],
        )
        return bool(answer == "OK")

    async def delete(self, project_id: str, budget_id: str) -> bool:
        partition = self.layout.partition(project_id)
        return bool(await self._delete(keys=[partition.prefix], args=[budget_id]) == "OK")

    async def reset(self, project_id: str, budget_id: str, who: str) -> bool:
        if await self.get(project_id, budget_id) is None:
            return False
        partition = self.layout.partition(project_id)
        answer = await self._reset(keys=[partition.prefix], args=[budget_id, self._clock(), who])
        return bool(answer == "OK")

    async def periods(self, project_id: str, budget_id: str, offset: int, size: int) -> Page:
        """Past periods, newest first."""
        await self.get(project_id, budget_id)  # a period that just ended is listed
        key = self.layout.partition(project_id).periods(budget_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lrange(key, offset, offset + size - 1)
            pipe.llen(key)
            entries, total = await pipe.execute()
        items = []
        for entry in entries:
            start, end, tokens, cost, limit_tokens, limit_cost = (int(v) for v in entry.split("|"))
            items.append(PeriodUsage(start, end, tokens, cost, limit_tokens, limit_cost))
        end_at = offset + len(entries)
        return Page(items, end_at if end_at < total else 0, int(total))

    # Alerts -------------------------------------------------------------------------

    async def alert_entry(self, project_id: str, alert_id: str) -> str | None:
        """The stream entry of an alert of the last 7 days."""
        value = await self._redis.get(self.layout.partition(project_id).alert(alert_id))
        return str(value) if value is not None else None

    async def last_alert_entry(self, project_id: str) -> str:
        entries = await self._redis.xrevrange(self.layout.partition(project_id).alerts, count=1)
        return str(entries[0][0]) if entries else "0-0"

    async def read_alerts(
        self, streams: RedisClient, project_id: str, after: str, block_ms: int
    ) -> list[Alert]:
        """Alerts after a stream entry, waiting up to `block_ms` for one."""
        key = self.layout.partition(project_id).alerts
        reply = await streams.xread({key: after}, count=100, block=block_ms)
        return [
            Alert.decode(fields["a"], entry_id)
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]

    # Webhooks -----------------------------------------------------------------------

    async def add_webhook(self, webhook: WebhookRecord, secret: str) -> bool:
        """False when the project has the most webhooks."""
        partition = self.layout.partition(webhook.project_id)
        fields = {"url": webhook.url, "secret": secret, "events": " ".join(webhook.event_types),
                  "ct": webhook.create_ms}  # fmt: skip
        answer = await self._webhook_put(
            keys=[partition.prefix],
            args=["ADD", webhook.webhook_id, MAX_WEBHOOKS_PER_PROJECT,
                  " ".join(webhook.event_types), *_flat(fields)],
        )  # fmt: skip
        return bool(answer == "OK")

    async def rotate_secret(
        self, project_id: str, webhook_id: str, secret: str, previous_until_ms: int
    ) -> bool:
        """A new secret; the old one signs too until `previous_until_ms`. False: no such
        webhook."""
        partition = self.layout.partition(project_id)
        answer = await self._webhook_put(
            keys=[partition.prefix],
            args=["ROTATE", webhook_id, MAX_WEBHOOKS_PER_PROJECT, secret, previous_until_ms],
        )
        return bool(answer == "OK")

    async def delete_webhook(self, project_id: str, webhook_id: str) -> bool:
        partition = self.layout.partition(project_id)
        answer = await self._webhook_put(
            keys=[partition.prefix], args=["DEL", webhook_id, MAX_WEBHOOKS_PER_PROJECT]
        )
        return bool(answer == "OK")

    async def webhooks(self, project_id: str) -> list[WebhookRecord]:
        partition = self.layout.partition(project_id)
        ids = sorted(await self._redis.hkeys(partition.webhooks))
        async with self._redis.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hmget(partition.webhook(wid), "url", "events", "ct")
            rows = await pipe.execute()
        return [
            WebhookRecord(wid, project_id, url, events.split(), int(ct))
            for wid, (url, events, ct) in zip(ids, rows, strict=True)
            if url is not None
        ]

    async def has_webhook(self, project_id: str, webhook_id: str) -> bool:
        partition = self.layout.partition(project_id)
        return bool(await self._redis.hexists(partition.webhooks, webhook_id))

    async def deliveries(self, project_id: str, webhook_id: str, offset: int, size: int) -> Page:
        """A webhook's deliveries, newest first."""
        partition = self.layout.partition(project_id)
        key = partition.deliveries(webhook_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrevrange(key, offset, offset + size - 1)
            pipe.zcard(key)
            ids, total = await pipe.execute()
        async with self._redis.pipeline(transaction=False) as pipe:
            for did in ids:
                pipe.hgetall(partition.delivery(did))
            rows = await pipe.execute()
        items = [_delivery(did, row) for did, row in zip(ids, rows, strict=True) if row]
        end = offset + len(ids)
        return Page(items, end if end < total else 0, int(total))

    async def claim(self, shard: Shard, lease_ms: int, limit: int) -> list[Claim]:
        """Claim due deliveries of a shard, one attempt each (see delivery_claim.lua)."""
        rows = await self._claim(
            keys=[shard.prefix], args=[self._clock(), lease_ms, limit, shard.partitions]
        )
        return [
            Claim(shard, str(member), int(attempt), str(url), str(secret), str(event),
                  str(kind), Alert.decode(str(body)), int(created), str(previous))
            for member, attempt, url, secret, event, kind, body, created, previous in rows
        ]  # fmt: skip

    async def finish(self, claim: Claim, status: str, code: int, error: str, next_ms: int) -> bool:
        """Record how an attempt ended; False when its lease had been taken over."""
        answer = await self._finish(
            keys=[claim.shard.prefix],
            args=[claim.member, claim.attempt, status, code, error[:500], self._clock(),
                  next_ms, claim.shard.partitions],
        )  # fmt: skip
        return bool(answer)


def _flat(fields: Mapping[str, object]) -> list[object]:
    return [item for pair in fields.items() for item in pair]


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def _delivery(delivery_id: str, row: dict[str, str]) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=delivery_id, webhook_id=row.get("wid", ""), event_id=row.get("event", ""),
        event_type=row.get("type", ""), status=row.get("status", "PENDING"),
        attempts=int(row.get("attempts", 0)), last_code=int(row.get("code", 0)),
        last_error=row.get("error", ""), next_ms=int(row.get("next", 0)),
        create_ms=int(row.get("ct", 0)), update_ms=int(row.get("ut", 0)),
    )  # fmt: skip


class BudgetStorage(Protocol):
    """What the usage service needs to keep budgets, alerts and webhooks."""

    async def create(self, project_id: str, budget_id: str, spec: BudgetSpec) -> str: ...
    async def get(self, project_id: str, budget_id: str) -> BudgetRecord | None: ...
    async def list_budgets(
        self, project_id: str, scope: str, scope_id: str, offset: int, size: int
    ) -> Page: ...
    async def update(self, project_id: str, budget_id: str, changes: dict[str, str]) -> bool: ...
    async def delete(self, project_id: str, budget_id: str) -> bool: ...
    async def reset(self, project_id: str, budget_id: str, who: str) -> bool: ...
    async def periods(self, project_id: str, budget_id: str, offset: int, size: int) -> Page: ...
    async def alert_entry(self, project_id: str, alert_id: str) -> str | None: ...
    async def last_alert_entry(self, project_id: str) -> str: ...
    async def read_alerts(
        self, streams: RedisClient, project_id: str, after: str, block_ms: int
    ) -> list[Alert]: ...
    async def add_webhook(self, webhook: WebhookRecord, secret: str) -> bool: ...
    async def rotate_secret(
        self, project_id: str, webhook_id: str, secret: str, previous_until_ms: int
    ) -> bool: ...
    async def delete_webhook(self, project_id: str, webhook_id: str) -> bool: ...
    async def webhooks(self, project_id: str) -> list[WebhookRecord]: ...
    async def has_webhook(self, project_id: str, webhook_id: str) -> bool: ...
    async def deliveries(
        self, project_id: str, webhook_id: str, offset: int, size: int
    ) -> Page: ...
    async def claim(self, shard: Shard, lease_ms: int, limit: int) -> list[Claim]: ...
    async def finish(
        self, claim: Claim, status: str, code: int, error: str, next_ms: int
    ) -> bool: ...


_: type[BudgetStorage] = BudgetStore
