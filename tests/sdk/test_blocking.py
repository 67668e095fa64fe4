"""The blocking twin against real services (run in a worker thread: the in-process
servers share the test's event loop)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.client import BudgetExhausted, Client
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, make_project


async def test_the_blocking_client_calls_guards_and_batches(cluster) -> None:
    await make_project(cluster.agent)
    await cluster.usage.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t", max_tokens=1000)
    )

    def use() -> None:
        with Client(token=ADMIN_TOKEN, agent_addr=cluster.address("agent"),
                    thread_addr=cluster.address("thread"),
                    usage_addr=cluster.address("usage")) as client:  # fmt: skip
            assert client.agents.GetProject(A.GetProjectRequest(project_id="demo")).id == "demo"
            with client.budget.guard("t", tokens=300, model="gpt-4o", agent_id="a") as guard:
                guard.record(prompt_tokens=200, completion_tokens=10)
            with pytest.raises(BudgetExhausted):
                with client.budget.guard("t", tokens=5000, model="gpt-4o", agent_id="a"):
                    pass
            for _ in range(300):
                client.usage.record(thread_id="t2", agent_id="a", project_id="demo",
                                    model="gpt-4o", prompt_tokens=1)  # fmt: skip
            with pytest.raises(grpc.RpcError):
                client.agents.GetProject(A.GetProjectRequest(project_id="nope"))

    await asyncio.to_thread(use)
    budget = await cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="t"))
    assert (budget.total_tokens, budget.reserved_tokens) == (210, 0)
    totals = (await cluster.usage.GetUsageOverview(U.GetUsageOverviewRequest())).totals
    assert totals.request_count == 301  # the guarded call and 300 buffered, sent on close
