"""Budgets under a real race: client processes reserve and record against agent, project and
model budgets through two usage-service replicas (real processes, one Redis). No HARD budget
ever accepts more than its limit; every budget's usage is exactly the sum of the records it
covers; alerts fire once each; webhook deliveries survive replicas killed mid-attempt."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from tests.e2e.test_processes import start_service, wait_serving
from tests.helpers import authed_channel, make_project, make_type, spawn, until
from tests.helpers.processes import ROOT
from tests.helpers.receiver import Receiver

CLIENTS = 6
ROUNDS = 150


async def start(redis_url: str, replicas: int, **env: str):  # type: ignore[no-untyped-def]
    folder = tempfile.mkdtemp(prefix="ap-")
    agent_address = f"unix:{folder}/agent.sock"
    usage_addresses = [f"unix:{folder}/usage-{i}.sock" for i in range(replicas)]
    agent = start_service("services.agent_svc", redis_url, GRPC_ADDRESS=agent_address,
                          REDIS_CLUSTER=env.get("REDIS_CLUSTER", "false"))  # fmt: skip
    usages = [
        start_service("services.usage_svc", redis_url, GRPC_ADDRESS=address,
                      AGENT_SVC_ADDR=agent_address, **env)
        for address in usage_addresses
    ]  # fmt: skip
    await asyncio.gather(*(wait_serving(a) for a in [agent_address, *usage_addresses]))
    return agent, agent_address, usages, usage_addresses


async def seeded_project(agent_address: str, usage_address: str, project: str):  # type: ignore[no-untyped-def]
    """Superuser stubs of the agent and a usage service, with `project` made and the test
    agent type."""
    agents = agent_service_pb2_grpc.AgentServiceStub(authed_channel(agent_address))
    usage = usage_service_pb2_grpc.UsageServiceStub(authed_channel(usage_address))
    await make_project(agents, project)
    await make_type(agents)
    return agents, usage


def budget_of(scope, scope_id="", **kw) -> U.CreateBudgetRequest:  # type: ignore[no-untyped-def]
    kw.setdefault("period", B.BUDGET_PERIOD_DAY)
    return U.CreateBudgetRequest(
        project_id="race", budget=B.Budget(scope=scope, scope_id=scope_id, **kw)
    )


async def test_racing_clients_on_two_replicas_never_pass_a_hard_limit(redis_url) -> None:
    agent_proc, agent_address, usages, addresses = await start(redis_url, 2)
    try:
        agents, usage = await seeded_project(agent_address, addresses[0], "race")
        workers = [await spawn(agents, f"w{i}", project_id="race") for i in range(3)]
        for t in range(4):
            await usage.SetThreadBudget(
                U.SetThreadBudgetRequest(project_id="race", thread_id=f"t{t}", max_tokens=10**9)
            )
        project = await usage.CreateBudget(budget_of(B.BUDGET_SCOPE_PROJECT, limit_tokens=30_000))
        agent = await usage.CreateBudget(
            budget_of(B.BUDGET_SCOPE_AGENT, workers[0].id, limit_tokens=6_000)
        )
        model = await usage.CreateBudget(
            budget_of(B.BUDGET_SCOPE_MODEL, "gpt-4o", limit_tokens=0, limit_cost_micros=120_000)
        )
        watched = await usage.CreateBudget(
            budget_of(B.BUDGET_SCOPE_PROJECT, limit_tokens=12_000,
                      enforcement=B.BUDGET_ENFORCEMENT_SOFT)
        )  # fmt: skip
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.e2e.budget_race_client", str(seed), str(ROUNDS),
                ",".join(w.id for w in workers), *addresses[seed % 2 :], *addresses[: seed % 2],
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            for seed in range(CLIENTS)
        ]  # fmt: skip
        async with asyncio.timeout(120):
            outputs = await asyncio.gather(*(c.communicate() for c in clients))
        assert all(c.returncode == 0 for c in clients), [err.decode()[-2000:] for _, err in outputs]
        records = [json.loads(line) for out, _ in outputs for line in out.decode().splitlines()]
        assert len(records) > 50

        async def state(b: B.Budget) -> B.Budget:
            return await usage.GetBudget(
                U.GetBudgetRequest(project_id="race", budget_id=b.budget_id)
            )

        covered = {
            project.budget_id: records,
            watched.budget_id: records,
            agent.budget_id: [r for r in records if r["agent"] == workers[0].id],
            model.budget_id: [r for r in records if r["model"] == "gpt-4o"],
        }
        for b in (project, agent, model, watched):
            now = await state(b)
            assert now.used_tokens == sum(r["tokens"] for r in covered[b.budget_id]), b
            assert now.used_cost_micros == sum(r["cost"] for r in covered[b.budget_id]), b
            assert now.reserved_tokens == 0 and now.reserved_cost_micros == 0
        for b in (project, agent, model):
            now = await state(b)
            assert not b.limit_tokens or now.used_tokens <= b.limit_tokens
            assert not b.limit_cost_micros or now.used_cost_micros <= b.limit_cost_micros
        # The race pressed on the limits: something was refused, the agent budget is nearly full.
        assert (await state(agent)).used_tokens > 6_000 * 0.5
        # The SOFT budget crossed 50, 80 and 100 %: three alerts, once each, whatever the race.
        assert (await state(watched)).percent_used >= 100
        alerts = await read_alerts(usage, "", watched.budget_id)
        assert [a.threshold for a in alerts] == [50, 80, 100]
        again = await read_alerts(usage, alerts[0].alert_id, watched.budget_id)
        assert [a.alert_id for a in again] == [a.alert_id for a in alerts[1:]]
        # A reset re-arms them.
        await usage.ResetBudget(
            U.ResetBudgetRequest(project_id="race", budget_id=watched.budget_id)
        )
        await usage.RecordUsage(U.RecordUsageRequest(
            usage_id="after-reset", thread_id="t0", agent_id=workers[1].id, project_id="race",
            model="mystery-model", prompt_tokens=12_000))  # fmt: skip
        rearmed = await read_alerts(usage, alerts[-1].alert_id, watched.budget_id)
        assert [a.alert_id for a in rearmed] == [f"{a.alert_id}.r1" for a in alerts]
    finally:
        for p in [*usages, agent_proc]:
            p.stop()


async def read_alerts(usage, after: str, budget_id: str) -> list[B.BudgetAlert]:  # type: ignore[no-untyped-def]
    """The kept alerts of one budget after `after` ("" for all kept)."""
    call = usage.WatchBudgetAlerts(
        U.WatchBudgetAlertsRequest(project_id="race", after_alert_id=after or "unknown")
    )
    got: list[B.BudgetAlert] = []
    try:
        async with asyncio.timeout(1.5):
            async for alert in call:
                got.append(alert)
    except TimeoutError:
        pass
    call.cancel()
    return [a for a in got if a.budget_id == budget_id]


async def test_replicas_killed_mid_delivery_lose_nothing(redis_url) -> None:
    env = {"WEBHOOK_TIMEOUT_SECONDS": "2", "WEBHOOK_ALLOW_HTTP": "true",
           "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true", "WEBHOOK_POLL_SECONDS": "0.1",
           "WEBHOOK_BACKOFF_BASE_SECONDS": "0.1"}  # fmt: skip
    agent_proc, agent_address, usages, addresses = await start(redis_url, 2, **env)
    receiver = await Receiver(stall=1).start()
    try:
        agents, usage = await seeded_project(agent_address, addresses[0], "race")
        worker = await spawn(agents, "w", project_id="race")
        hook = await usage.CreateWebhook(
            U.CreateWebhookRequest(project_id="race", url=receiver.url)
        )
        await usage.CreateBudget(budget_of(B.BUDGET_SCOPE_PROJECT, limit_tokens=100,
                                           alert_thresholds=[100]))  # fmt: skip
        await usage.RecordUsage(U.RecordUsageRequest(
            usage_id="u1", thread_id="t0", agent_id=worker.id, project_id="race",
            model="m", prompt_tokens=100))  # fmt: skip
        await receiver.wait_for(1)  # the first attempt is in flight: the receiver holds it
        for process in usages:
            process.process.kill()  # every replica dies mid-attempt
            process.process.wait(10)
        replacement = start_service(
            "services.usage_svc", redis_url, GRPC_ADDRESS=addresses[0],
            AGENT_SVC_ADDR=agent_address, **env,
        )  # fmt: skip
        usages.append(replacement)
        await wait_serving(addresses[0])
        deliveries = await receiver.wait_for(2, timeout=30)  # after the lease, attempt 2
        assert (
            deliveries[0].headers["agentplane-event-id"]
            == deliveries[1].headers["agentplane-event-id"]
        )
        log = U.ListWebhookDeliveriesRequest(project_id="race", webhook_id=hook.webhook.webhook_id)
        usage = usage_service_pb2_grpc.UsageServiceStub(authed_channel(addresses[0]))

        async def delivered():  # type: ignore[no-untyped-def]
            (entry,) = (await usage.ListWebhookDeliveries(log)).deliveries
            return entry if entry.status == B.DELIVERY_STATUS_DELIVERED else None

        entry = await until(delivered, 10)
        assert entry.attempts == 2 and entry.last_response_code == 200
    finally:
        receiver.release.set()
        await receiver.stop()
        for p in [*usages, agent_proc]:
            p.stop()
