"""Calls between services, counted from the services' own metrics: a 100-agent ListAgents
page costs at most 2 calls to other services, and none comes back to the agent service
(once: 100 GetAgentUsage calls, each asking the agent service about its agent again)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import make_project, make_type, spawn


def served() -> dict[tuple[str, str], float]:
    """RPCs served so far in this process, by (service, method)."""
    counts: dict[tuple[str, str], float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "agentplane_rpc":
            continue
        for sample in metric.samples:
            if sample.name == "agentplane_rpc_total":
                key = (sample.labels["service"], sample.labels["method"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def delta(before: dict, after: dict) -> dict[tuple[str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def test_a_100_agent_page_costs_at_most_two_peer_calls(cluster) -> None:
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agents = [await spawn(cluster.agent, f"a{i}") for i in range(100)]
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id="u1", thread_id="t1", agent_id=agents[7].id, project_id="demo", model="gpt-4o",
        prompt_tokens=40, completion_tokens=2))  # fmt: skip
    before = served()
    page = await cluster.agent.ListAgents(A.ListAgentsRequest(project_id="demo", page_size=100))
    calls = delta(before, served())
    assert len(page.agents) == 100
    assert {a.id: a.tokens_used for a in page.agents}[agents[7].id] == 42  # enriched
    others = {k: v for k, v in calls.items() if "AgentService" not in k[1]}
    assert sum(others.values()) <= 2, calls
    back = {
        k: v
        for k, v in calls.items()
        if "AgentService" in k[1] and not k[1].endswith("/ListAgents")
    }
    assert not back, calls  # nothing loops back to the agent service


async def test_a_100_thread_page_costs_one_peer_call(cluster) -> None:
    """A ListThreads page gets its budgets in one call (once: one GetThreadBudget call per
    thread of the page)."""
    from agentplane.thread.v1 import thread_pb2
    from agentplane.thread.v1 import thread_service_pb2 as T

    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agent = await spawn(cluster.agent, "a")
    threads = [
        await cluster.thread.CreateThread(T.CreateThreadRequest(thread=thread_pb2.Thread(
            project_id="demo", participants=[agent.id], max_tokens=1000 + i)))
        for i in range(100)
    ]  # fmt: skip
    before = served()
    page = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo", page_size=100))
    calls = delta(before, served())
    assert len(page.threads) == 100
    assert {t.id: t.max_tokens for t in page.threads}[threads[7].id] == 1007  # enriched
    others = {k: v for k, v in calls.items() if "ThreadService" not in k[1]}
    assert sum(others.values()) <= 1, calls
