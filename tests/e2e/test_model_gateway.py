"""The model gateway as real processes (SPEC §14): two model-gateway replicas in front of
two usage-service replicas, 3 agents x 32 concurrent streams through the official
`openai` SDK against tight HARD budgets — by the fake provider's own tally no budget is
ever passed, and what is recorded equals that tally; then a replica SIGKILLed mid-stream
leaves its call charged in full at its hold's expiry, flagged as an estimate."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import openai

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import api_key_pb2
from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.e2e.test_budget_race import seeded_project, start
from tests.helpers import spawn, until
from tests.helpers.fake_provider import PROVIDER_KEY, fake_provider, providers_yaml
from tests.helpers.processes import ServiceProcess

AGENTS, STREAMS = 3, 32
AGENT_LIMIT, PROJECT_LIMIT = 6_000, 15_000


def start_models(
    redis_url: str, usage_address: str, agent_address: str, providers: Path
) -> ServiceProcess:
    return ServiceProcess(
        "gateway.models", REDIS_URL=redis_url, MODEL_HTTP_PORT="0", AGENT_SVC_ADDR=agent_address,
        USAGE_SVC_ADDR=usage_address, MODEL_PROVIDERS_FILE=str(providers),
        FAKE_PROVIDER_KEY=PROVIDER_KEY, MODEL_CALL_MAX_DURATION="3s", LOG_FORMAT="json",
    )  # fmt: skip


async def test_racing_streams_never_pass_a_hard_budget_and_a_killed_replica_is_charged(
    redis_url: str, tmp_path: Path
) -> None:
    agent_proc, agent_address, usages, addresses = await start(
        redis_url, 2, RETENTION_SWEEP_INTERVAL="0.2"
    )
    gateways: list[ServiceProcess] = []
    try:
        agents, usage = await seeded_project(agent_address, addresses[0], "race")
        keys = []
        for i in range(AGENTS):
            agent = await spawn(agents, f"a{i}", project_id="race")
            key = await agents.CreateApiKey(
                A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id)
            )
            keys.append((agent.id, key.token))
            await usage.CreateBudget(U.CreateBudgetRequest(project_id="race", budget=B.Budget(
                scope=B.BUDGET_SCOPE_AGENT, scope_id=agent.id, limit_tokens=AGENT_LIMIT,
                period=B.BUDGET_PERIOD_DAY, enforcement=B.BUDGET_ENFORCEMENT_HARD)))  # fmt: skip
        project = await usage.CreateBudget(U.CreateBudgetRequest(project_id="race", budget=B.Budget(
            scope=B.BUDGET_SCOPE_PROJECT, limit_tokens=PROJECT_LIMIT, period=B.BUDGET_PERIOD_DAY,
            enforcement=B.BUDGET_ENFORCEMENT_HARD)))  # fmt: skip
        async with fake_provider() as fake:
            providers = tmp_path / "providers.yaml"
            providers.write_text(providers_yaml(fake.url))
            gateways = [start_models(redis_url, a, agent_address, providers) for a in addresses]
            urls = [f"http://127.0.0.1:{g.port()}/v1" for g in gateways]
            fake.behaviour.pieces, fake.behaviour.delay_s = 120, 0.002

            async def stream(agent: int, n: int) -> str:
                client = openai.AsyncOpenAI(
                    base_url=urls[n % 2], api_key=keys[agent][1], max_retries=0
                )
                try:
                    stream = await client.chat.completions.create(
                        model=f"gpt-agent{agent}", stream=True, max_tokens=400,
                        messages=[{"role": "user", "content": f"call {n} of agent {agent}"}],
                    )  # fmt: skip
                    async for _ in stream:
                        pass
                    return "ok"
                except openai.RateLimitError as exc:
                    assert exc.code == "budget_exceeded", exc.message
                    return "refused"
                finally:
                    await client.close()

            outcomes = await asyncio.gather(
                *(stream(a, n) for a in range(AGENTS) for n in range(STREAMS))
            )
            assert outcomes.count("ok") > 0 and outcomes.count("refused") > 0

            async def settled() -> bool:
                shown = await usage.GetBudget(
                    U.GetBudgetRequest(project_id="race", budget_id=project.budget_id)
                )
                return shown.reserved_tokens == 0

            await until(settled)
            per_agent = {i: 0 for i in range(AGENTS)}
            for billed in fake.billed:
                per_agent[int(billed.model.removeprefix("gpt-agent"))] += (
                    billed.usage.prompt + billed.usage.completion
                )
            assert max(per_agent.values()) <= AGENT_LIMIT, per_agent  # the provider's own tally
            assert sum(per_agent.values()) <= PROJECT_LIMIT
            for i, (agent_id, _) in enumerate(keys):
                recorded = await usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))
                assert recorded.totals.total_tokens == per_agent[i]  # exactly, every call
                assert recorded.totals.estimated_request_count == 0

            # A replica SIGKILLed mid-stream: its call is charged in full when the hold expires.
            fake.behaviour.pieces, fake.behaviour.delay_s = 10_000, 0.05
            await usage.DeleteBudget(
                U.DeleteBudgetRequest(project_id="race", budget_id=project.budget_id)
            )
            victim = keys[0]
            before = (await usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=victim[0]))).totals
            client = openai.AsyncOpenAI(base_url=urls[0], api_key=victim[1], max_retries=0)
            cut = await client.chat.completions.create(
                model="gpt-agent0",
                stream=True,
                max_tokens=20,
                messages=[{"role": "user", "content": "go"}],
            )
            await anext(aiter(cut))
            os.kill(gateways[0].process.pid, signal.SIGKILL)
            await client.close()

            async def charged():  # type: ignore[no-untyped-def]
                now = (await usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=victim[0]))).totals
                return now if now.estimated_request_count > before.estimated_request_count else None

            after = await until(charged, timeout=30)
            assert after.request_count == before.request_count + 1
            charged_tokens = after.total_tokens - before.total_tokens
            assert charged_tokens >= fake.billed[-1].usage.prompt + fake.billed[-1].usage.completion
            assert charged_tokens >= 20  # the whole hold: its prompt bound and the cap
    finally:
        for process in [*gateways, *usages, agent_proc]:
            process.stop()
