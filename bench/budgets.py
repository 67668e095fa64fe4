"""The bench's budget phase: an owner key, and budgets of every scope covering each record
the load makes — its thread's, its agent's, its model's, the key's and the project's."""

from __future__ import annotations

import grpc

from agentplane.agent.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    agent_type_pb2,
    api_key_pb2,
    project_pb2,
)
from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from bench.load import Caller, channel

HUGE = 10**12  # never reached: the bench measures the charging, not refusals


async def owner(agent_target: str) -> tuple[Caller, str]:
    """An owner key (and its key id), and project "bench" with eight agents of its own."""
    async with channel(agent_target) as admin_channel:
        admin = agent_service_pb2_grpc.AgentServiceStub(admin_channel)
        made = await admin.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
            role=api_key_pb2.API_KEY_ROLE_OWNER, subject="bench-owner"))  # fmt: skip
        try:
            await admin.CreateAgentType(agent_service_pb2.CreateAgentTypeRequest(
                agent_type=agent_type_pb2.AgentType(id="bench", display_name="Bench",
                                                    is_active=True)))  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
    token, key_id = made.token, made.api_key.key_id
    bearer = [("authorization", f"Bearer {token}")]
    async with grpc.aio.insecure_channel(agent_target) as owner_channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(owner_channel)
        await agents.CreateProject(agent_service_pb2.CreateProjectRequest(
            project_id="bench", project=project_pb2.Project(display_name="Bench")),
            metadata=bearer)  # fmt: skip
        ids = []
        for i in range(8):
            spawned = await agents.SpawnAgent(agent_service_pb2.SpawnAgentRequest(
                project_id="bench", agent=agent_pb2.Agent(agent_type_id="bench", name=f"a{i}")),
                metadata=bearer)  # fmt: skip
            ids.append(spawned.id)
    return Caller(token=token, agents=tuple(ids)), key_id


async def five_budgets(usage_target: str, caller: Caller, key_id: str) -> None:
    """Budgets of every scope covering the load's records: the project's, the model's, the
    key's and each agent's (the thread budgets make five)."""
    bearer = [("authorization", f"Bearer {caller.token}")]
    scopes = [(B.BUDGET_SCOPE_PROJECT, ""), (B.BUDGET_SCOPE_MODEL, "gpt-4o"),
              (B.BUDGET_SCOPE_API_KEY, key_id)]  # fmt: skip
    scopes += [(B.BUDGET_SCOPE_AGENT, a) for a in caller.agents]
    async with grpc.aio.insecure_channel(usage_target) as usage_channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(usage_channel)
        for scope, scope_id in scopes:
            await usage.CreateBudget(U.CreateBudgetRequest(project_id="bench", budget=B.Budget(
                scope=scope, scope_id=scope_id, limit_tokens=HUGE, limit_cost_micros=HUGE,
                period=B.BUDGET_PERIOD_DAY)), metadata=bearer)  # fmt: skip
