"""Data spread by project (SPEC §10): on a real three-master Redis Cluster, sixty
projects' agents, threads, messages and usage spread over every master, and the
superuser's cross-project listings page through every item exactly once."""

from __future__ import annotations

import redis as redis_sync

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import make_project, make_type, spawn
from tests.helpers.servers import start_cluster, stop_cluster
from tests.thread_svc.test_threads import payload

PROJECTS = [f"team-{n:02d}" for n in range(60)]


def key_split(nodes) -> list[int]:  # type: ignore[no-untyped-def]
    counts = []
    for node in nodes:
        with redis_sync.Redis(host="127.0.0.1", port=node.port) as client:
            counts.append(sum(1 for _ in client.scan_iter(match="ap:*", count=1000)))
    return counts


async def pages(call, request, field: str) -> tuple[list[str], set[int]]:  # type: ignore[no-untyped-def]
    seen, totals = [], set()
    while True:
        reply = await call(request)
        seen += [item.id for item in getattr(reply, field)]
        totals.add(reply.total_size)
        if not reply.next_page_token:
            return seen, totals
        request.page_token, request.skip = reply.next_page_token, 0


async def test_sixty_projects_spread_over_every_master(redis_cluster) -> None:
    redis_cluster.flush()
    cluster = await start_cluster(redis_cluster.url, True)
    try:
        await make_type(cluster.agent)
        agents, threads = [], []
        for project in PROJECTS:
            await make_project(cluster.agent, project)
            for name in ("planner", "coder", "critic"):
                agent = await spawn(cluster.agent, name, project)
                agents.append(agent.id)
                sent = await cluster.thread.InjectMessage(
                    T.InjectMessageRequest(to=agent.id, payload=payload(text="go"))
                )
                threads.append(sent.thread_id)
                await cluster.usage.RecordUsage(
                    U.RecordUsageRequest(
                        usage_id=f"u-{agent.id}", agent_id=agent.id, thread_id=sent.thread_id,
                        model="gpt-4o",
                        prompt_tokens=10, completion_tokens=5,
                    )
                )  # fmt: skip

        split = key_split(redis_cluster.nodes)
        shares = [round(100 * n / sum(split), 1) for n in split]
        print(f"\nkeys per master: {split} = {shares}% of {sum(split)}")
        assert all(n >= 0.2 * sum(split) for n in split), split

        seen, totals = await pages(
            cluster.agent.ListAgents, A.ListAgentsRequest(project_id="-", page_size=7), "agents"
        )
        assert sorted(seen) == sorted(agents) and len(seen) == len(set(seen)) == 180
        assert totals == {180}
        seen, totals = await pages(
            cluster.thread.ListThreads, T.ListThreadsRequest(project_id="-", page_size=11),
            "threads",
        )  # fmt: skip
        assert sorted(seen) == sorted(threads) and len(set(seen)) == 180 and totals == {180}
        idle, _ = await pages(
            cluster.agent.ListAgents,
            A.ListAgentsRequest(project_id="-", status=1, page_size=50, skip=3), "agents",
        )  # fmt: skip
        assert len(idle) == 177  # skipped once, before the first page
        overview = await cluster.agent.GetOverview(A.GetOverviewRequest())
        assert overview.project_count == 60 and overview.agents.total == 180
        assert overview.threads.active == 180
    finally:
        await stop_cluster(cluster)
