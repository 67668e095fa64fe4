"""Cross-project views as the number of projects grows (SPEC §17): the superuser's
`GetOverview`, a 100-agent `ListAgents("-")` page and a 100-thread `ListThreads("-")` page,
p50 over repeated calls, at 100 projects and again at 10,000 (each project with one agent
and one thread), against a whole stack of real processes. Target: within 2x.

    python -m bench.projects    # this phase alone (BENCH_PROJECTS=100,10000)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agentplane.agent.v1 import agent_pb2, agent_service_pb2_grpc, agent_type_pb2, project_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2, thread_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from bench import stack
from bench.load import channel as channel_to

SIZES = tuple(int(n) for n in os.environ.get("BENCH_PROJECTS", "100,10000").split(","))
CALLS = 60
BATCH = 100


async def _grow(agents: Any, threads: Any, start: int, end: int) -> None:
    """Projects start..end-1, each with one agent and one thread."""

    async def one(n: int) -> None:
        project = f"proj-{n:05d}"
        await agents.CreateProject(
            A.CreateProjectRequest(
                project_id=project, project=project_pb2.Project(display_name=project)
            )
        )
        agent = await agents.SpawnAgent(
            A.SpawnAgentRequest(
                project_id=project, agent=agent_pb2.Agent(agent_type_id="worker", name="w")
            )
        )
        await threads.CreateThread(T.CreateThreadRequest(thread=thread_pb2.Thread(
            project_id=project, title="t", participants=[agent.id])))  # fmt: skip

    for first in range(start, end, BATCH):
        await asyncio.gather(*(one(n) for n in range(first, min(end, first + BATCH))))


async def _p50(call: Callable[[], Awaitable[Any]]) -> float:
    await call()  # warm
    timings = []
    for _ in range(CALLS):
        began = time.perf_counter()
        await call()
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings)


async def _measure(running: stack.Stack) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    async with (
        channel_to(running.addresses["agent"]) as agent_channel,
        channel_to(running.addresses["thread"]) as thread_channel,
    ):
        agents = agent_service_pb2_grpc.AgentServiceStub(agent_channel)
        threads = thread_service_pb2_grpc.ThreadServiceStub(thread_channel)
        await agents.CreateAgentType(A.CreateAgentTypeRequest(agent_type=agent_type_pb2.AgentType(
            id="worker", display_name="Worker", is_active=True)))  # fmt: skip
        have = 0
        for size in SIZES:
            await _grow(agents, threads, have, size)
            have = size
            overview = await _p50(lambda: agents.GetOverview(A.GetOverviewRequest()))
            listing = await _p50(
                lambda: agents.ListAgents(A.ListAgentsRequest(project_id="-", page_size=100))
            )
            thread_page = await _p50(
                lambda: threads.ListThreads(T.ListThreadsRequest(project_id="-", page_size=100))
            )
            figures[str(size)] = {
                "get_overview_p50_ms": overview,
                "list_agents_all_page_p50_ms": listing,
                "list_threads_all_page_p50_ms": thread_page,
            }
    small, large = figures[str(SIZES[0])], figures[str(SIZES[-1])]
    figures["growth"] = {k: large[k] / small[k] for k in small}
    return figures


def cross_project_views() -> dict[str, Any]:
    with stack.running() as running:
        return asyncio.run(_measure(running))


if __name__ == "__main__":
    print(json.dumps(cross_project_views(), indent=2))
