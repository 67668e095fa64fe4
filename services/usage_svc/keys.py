"""Where the usage data lives in Redis (docs/api.md §8, "Storage").

Usage data is spread over `shards` hash tags, `ap:usage:{uN}:`, chosen by the project id
(crc32). A project's partition, `ap:usage:{uN}:p:<project>:`, holds everything one of its
records touches — its threads' counters and budgets, reservations, idempotency keys, its
budgets, alerts and webhook deliveries — beside the shard's cluster-wide aggregates, so
each write is one atomic Lua script in one slot, also on Redis Cluster. The scripts derive
the key names inside a partition from its prefix (see lua/_prelude.lua).

A thread's project is found from the thread directory, `ap:usage:thread-project:<id>`,
written once when the thread's budget is created.
"""

from __future__ import annotations

import zlib

PREFIX = "ap:usage:"
NO_PROJECT = "-"  # the partition of records made without a project


class Shard:
    """Key names of one shard's aggregates."""

    def __init__(self, index: int) -> None:
        self.prefix = f"{PREFIX}{{u{index}}}:"
        self.partitions = self.prefix + "p:"
        self.totals = self.prefix + "totals"
        self.stats = self.prefix + "stats"
        self.budgets = self.prefix + "budgets"
        self.agents_rank = self.prefix + "rank:agents"
        self.models_rank = self.prefix + "rank:models"
        self.due = self.prefix + "due"
        self.closed = self.prefix + "closed"  # closed thread budgets, by closing time
        self.expiring = self.prefix + "expiring"  # projects with holds, by earliest expiry
        self.charge = self.prefix + "charge"  # expired holds to record in full, by expiry
        self.charge_entries = self.prefix + "charge:e"  # their reservation entries

    def agent(self, agent_id: str) -> str:
        return f"{self.prefix}agent:{agent_id}"

    def model(self, model: str) -> str:
        return f"{self.prefix}model:{model}"


class Partition:
    """Key names of one project's partition."""

    def __init__(self, shard: Shard, project_id: str) -> None:
        self.shard = shard
        self.project_id = project_id
        self.prefix = f"{shard.partitions}{project_id or NO_PROJECT}:"
        self.totals = self.prefix + "totals"
        self.agents_rank = self.prefix + "rank:agents"
        self.res = self.prefix + "res"
        self.resexp = self.prefix + "resexp"
        self.cover = self.prefix + "cover"
        self.budget_list = self.prefix + "budgets"
        self.alerts = self.prefix + "alerts"
        self.webhooks = self.prefix + "webhooks"
        self.active = self.prefix + "active"  # the project's unclosed thread budgets

    def thread(self, thread_id: str) -> str:
        return f"{self.prefix}thread:{thread_id}"

    def budget(self, budget_id: str) -> str:
        return f"{self.prefix}budget:{budget_id}"

    def periods(self, budget_id: str) -> str:
        return f"{self.prefix}budget:{budget_id}:periods"

    def budgets_of_scope(self, scope: str) -> str:
        return f"{self.prefix}budgets:{scope}"

    def alert(self, alert_id: str) -> str:
        return f"{self.prefix}alert:{alert_id}"

    def webhook(self, webhook_id: str) -> str:
        return f"{self.prefix}webhook:{webhook_id}"

    def deliveries(self, webhook_id: str) -> str:
        return f"{self.prefix}webhook:{webhook_id}:deliveries"

    def delivery(self, delivery_id: str) -> str:
        return f"{self.prefix}delivery:{delivery_id}"


class Layout:
    """The shards, and which one holds a project."""

    def __init__(self, shards: int) -> None:
        self.shards = [Shard(i) for i in range(shards)]

    def shard(self, project_id: str) -> Shard:
        key = (project_id or NO_PROJECT).encode()
        return self.shards[zlib.crc32(key) % len(self.shards)]

    def partition(self, project_id: str) -> Partition:
        return Partition(self.shard(project_id), project_id)

    @staticmethod
    def thread_directory(thread_id: str) -> str:
        return f"{PREFIX}thread-project:{thread_id}"
