"""Move agent and thread data from the one-hash-tag layout to the per-project layout.

    python -m scripts.upgrade_layout [--redis-url URL] [--cluster]

Run once, with the agent, thread and usage services stopped, after upgrading to the
version that keys agents and threads per project (README, "Bounded memory and data spread
by project"). It copies each key with DUMP/RESTORE (streams keep their consumer groups
and pending deliveries), writes the directory entries, removal queues and per-project
counters the new version keeps, and deletes the old keys. It walks the old indexes, never
`KEYS`. Safe to run again after an interruption (copies replace, deletes are last), and a
no-op on data that is already in the new layout. Prints what it moved.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import redis as redis_sync
from redis.cluster import RedisCluster

from services.agent_svc.store import STATUSES
from services.agent_svc.store import Keys as AgentKeys
from services.common.partitions import directory_key
from services.thread_svc.store import Keys as ThreadKeys
from services.usage_svc.keys import Layout

OLD_AGENT = "ap:agent:{a}:"
OLD_THREAD = "ap:thread:{t}:"
THREAD_STATUSES = ("ALL", "ACTIVE", "COMPLETED", "FAILED", "KILLED")
COUNTER_FIELDS = ("n_total", "tasks_completed", *(f"n_{s}" for s in STATUSES))


class Mover:
    def __init__(self, r: Any) -> None:
        self.r = r
        self.moved = 0
        self.old: list[str] = []  # deleted at the end of each step

    def copy(self, old: str, new: str) -> bool:
        """Copy `old` to `new` (replacing it) if `old` exists; it is deleted by `done`."""
        dumped = self.r.dump(old)
        if dumped is None:
            return False
        ttl = max(0, int(self.r.pttl(old)))
        self.r.restore(new, ttl, dumped, replace=True)
        self.old.append(old)
        self.moved += 1
        return True

    def done(self) -> None:
        for key in self.old:
            self.r.delete(key)
        self.old = []


def upgrade_agents(m: Mover) -> int:
    r, agents = m.r, 0
    for member in r.zrange(AgentKeys.projects, 0, -1):
        agents += _upgrade_project_agents(m, member.split("|", 1)[1])
    # Cluster counters of agents are now the sum of the projects' counters.
    r.hdel(AgentKeys.counters, "agents", "tasks_completed", *(f"n_{s}" for s in STATUSES))
    for status in ("ALL", *STATUSES):
        r.delete(f"{OLD_AGENT}idx:-:{status}")
    return agents


def _upgrade_project_agents(m: Mover, project: str) -> int:
    """One project's agents, indexes, names, events and counters; how many agents."""
    r, agents = m.r, 0
    record = AgentKeys.project(project)
    for agent_id in r.zrange(f"{OLD_AGENT}idx:{project}:ALL", 0, -1):
        if not m.copy(f"{OLD_AGENT}agent:{agent_id}", AgentKeys(project).agent(agent_id)):
            continue
        r.set(directory_key("agent", agent_id), project)
        status, ended, updated = r.hmget(
            AgentKeys(project).agent(agent_id), "status", "terminate_ms", "update_ms"
        )
        if status == "TERMINATED":
            r.zadd(AgentKeys(project).terminated, {agent_id: int(ended or updated or 0)})
        agents += 1
    for status in ("", *STATUSES):
        m.copy(f"{OLD_AGENT}idx:{project}:{status or 'ALL'}", AgentKeys(project).index(status))
    m.copy(f"{OLD_AGENT}names:{project}", f"{AgentKeys(project).prefix}names")
    m.copy(f"{OLD_AGENT}events:{project}", AgentKeys(project).events)
    counters = dict(zip(COUNTER_FIELDS, r.hmget(record, *COUNTER_FIELDS), strict=True))
    if any(v is not None for v in counters.values()):
        r.hset(AgentKeys(project).stats, mapping={k: v for k, v in counters.items() if v})
        r.hdel(record, *COUNTER_FIELDS)
    m.done()
    return agents


def upgrade_threads(m: Mover) -> int:
    r = m.r
    projects: set[str] = set()
    agents: dict[str, str] = {}  # agent id -> project
    thread_projects: dict[str, str] = {}  # thread id -> project
    unacked: dict[tuple[str, str], str] = {}  # (thread id, log entry id) -> inbox entry id
    for member in r.zrange(f"{OLD_THREAD}idx:p:-:ALL", 0, -1):
        thread_id = member.split("|", 1)[1]
        project = _upgrade_thread(m, thread_id, agents)
        if project:
            thread_projects[thread_id] = project
            projects.add(project)
    for project in sorted(projects):
        keys = ThreadKeys(project)
        for status in THREAD_STATUSES:
            new = keys.project_index("" if status == "ALL" else status)
            m.copy(f"{OLD_THREAD}idx:p:{project}:{status}", new)
        m.done()
    for agent_id, project in sorted(agents.items()):
        unacked.update(_upgrade_agent_threads(m, agent_id, project))
    link_inboxes(r, unacked, thread_projects)
    for status in THREAD_STATUSES:
        r.delete(f"{OLD_THREAD}idx:p:-:{status}")
    return len(thread_projects)


def _upgrade_thread(m: Mover, thread_id: str, agents: dict[str, str]) -> str:
    """One thread moved into its project (its participants noted in `agents`); its
    project, or "" when it was gone."""
    r = m.r
    fields = r.hgetall(f"{OLD_THREAD}thread:{thread_id}")
    if not fields:
        return ""
    project = fields["project_id"]
    keys = ThreadKeys(project)
    parts = r.smembers(f"{OLD_THREAD}parts:{thread_id}")
    m.copy(f"{OLD_THREAD}thread:{thread_id}", keys.thread(thread_id))
    m.copy(f"{OLD_THREAD}parts:{thread_id}", keys.participants(thread_id))
    m.copy(f"{OLD_THREAD}log:{thread_id}", keys.log(thread_id))
    for agent_id in parts:
        agents[agent_id] = project
        m.copy(f"{OLD_THREAD}tmsgs:{thread_id}:{agent_id}",
               keys.thread_messages_of(thread_id, agent_id))  # fmt: skip
    r.set(directory_key("thread", thread_id), project)
    r.zadd(ThreadKeys.projects, {project: 0})
    if fields.get("status") != "ACTIVE":
        r.zadd(keys.ended, {thread_id: int(fields.get("end_ms") or 0)})
    m.done()
    return str(project)


def _upgrade_agent_threads(m: Mover, agent_id: str, project: str) -> dict[tuple[str, str], str]:
    """An agent's thread indexes, messages and inbox moved; its unacknowledged entries."""
    r = m.r
    unacked: dict[tuple[str, str], str] = {}
    keys = ThreadKeys(project)
    for status in THREAD_STATUSES:
        m.copy(f"{OLD_THREAD}idx:a:{agent_id}:{status}",
               keys.agent_index(agent_id, "" if status == "ALL" else status))  # fmt: skip
    m.copy(f"{OLD_THREAD}msgs:{agent_id}", keys.messages_of(agent_id))
    if m.copy(f"{OLD_THREAD}inbox:{agent_id}", keys.inbox(agent_id)):
        trim_acknowledged(r, keys.inbox(agent_id))
        unacked.update(inbox_entries(r, keys.inbox(agent_id)))
    m.done()
    return unacked


def trim_acknowledged(r: Any, inbox: str) -> None:
    """Delete the entries the group has acknowledged: delivered (up to its last-delivered
    id) and no longer pending. (The new version deletes each entry as it is acked.)"""
    groups = {g["name"]: g for g in r.xinfo_groups(inbox)}
    if "inbox" not in groups:
        return
    last = groups["inbox"]["last-delivered-id"]
    pending = {p["message_id"] for p in r.xpending_range(inbox, "inbox", "-", "+", 1_000_000)}
    done = [e for e, _ in r.xrange(inbox, "-", last) if e not in pending]
    for start in range(0, len(done), 1000):
        r.xdel(inbox, *done[start : start + 1000])


def inbox_entries(r: Any, inbox: str) -> dict[tuple[str, str], str]:
    """{(thread id, log entry id): inbox entry id} of what an inbox still holds."""
    return {
        (fields["thread_id"], fields["entry"]): entry_id
        for entry_id, fields in r.xrange(inbox)
        if "thread_id" in fields and "entry" in fields
    }


def link_inboxes(
    r: Any, unacked: dict[tuple[str, str], str], thread_projects: dict[str, str]
) -> None:
    """The new version's log entries name their inbox entry (so that removing a thread
    removes its undelivered messages too): rewrite the logs that have such messages, same
    entry ids, with the `inbox` field added."""
    by_thread: dict[str, dict[str, str]] = {}
    for (thread_id, entry_id), inbox_id in unacked.items():
        by_thread.setdefault(thread_id, {})[entry_id] = inbox_id
    for thread_id, links in sorted(by_thread.items()):
        project = thread_projects.get(thread_id)
        if project is None:
            continue
        log = ThreadKeys(project).log(thread_id)
        entries = r.xrange(log)
        if all("inbox" in fields for entry_id, fields in entries if entry_id in links):
            continue  # already linked (a second run)
        pipe = r.pipeline(transaction=not isinstance(r, RedisCluster))
        pipe.delete(log)
        for entry_id, fields in entries:
            if entry_id in links:
                fields = {**fields, "inbox": links[entry_id]}
            pipe.xadd(log, fields, id=entry_id)
        pipe.execute()


def queue_closed_budgets(r: Any, shards: int) -> int:
    """Closed thread budgets enter the usage service's removal queue."""
    queued = 0
    for shard in Layout(shards).shards:
        for member, _score in r.zscan_iter(shard.budgets, count=1000):
            thread_id, _, project = member.rpartition("|")
            thread = Layout(shards).partition(project).thread(thread_id)
            closed, update_ms = r.hmget(thread, "closed", "update_ms")
            if closed == "1" and r.zscore(shard.closed, member) is None:
                r.zadd(shard.closed, {member: int(update_ms or 0)})
                queued += 1
    return queued


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("REDIS_CLUSTER", "").lower() == "true",
    )
    parser.add_argument(
        "--usage-shards", type=int, default=int(os.environ.get("USAGE_SHARDS", "8"))
    )
    args = parser.parse_args(argv)  # fmt: skip
    cls = RedisCluster if args.cluster else redis_sync.Redis
    r = cls.from_url(args.redis_url, decode_responses=True)
    try:
        m = Mover(r)
        agents = upgrade_agents(m)
        threads = upgrade_threads(m)
        budgets = queue_closed_budgets(r, args.usage_shards)
    finally:
        r.close()
    print(f"moved {agents} agents and {threads} threads ({m.moved} keys); "
          f"queued {budgets} closed thread budgets for retention")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
