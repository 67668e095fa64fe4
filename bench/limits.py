"""What limits cost a reservation (SPEC §19): `ReserveBudget` through a real usage service,
against a thread covered by three calendar budgets (project, model, thread) alone, and
against one covered by the same three plus a tokens-per-minute window, a
requests-per-minute window and a `max_in_flight` cap. Rounds of each are interleaved, so
both see the same machine; each reservation is released (untimed) so none fills up.
Target: within 10%.

    python -m bench.limits    # this phase alone
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import agent_service_pb2_grpc, project_pb2
from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from bench import stack
from bench.load import channel as channel_to

ROUNDS = 6
PER_ROUND = 1_500
CONCURRENCY = 16
HUGE = 10**12


async def _prepare(agents: Any, usage: Any, project: str, limits: bool) -> None:
    await agents.CreateProject(A.CreateProjectRequest(
        project_id=project, project=project_pb2.Project(display_name=project)))  # fmt: skip
    await usage.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id=project, thread_id=f"{project}-t", max_tokens=HUGE)
    )
    calendar = [(B.BUDGET_SCOPE_PROJECT, ""), (B.BUDGET_SCOPE_MODEL, "gpt-4o"),
                (B.BUDGET_SCOPE_THREAD, f"{project}-t")]  # fmt: skip
    made = [B.Budget(scope=s, scope_id=i, limit_tokens=HUGE, period=B.BUDGET_PERIOD_DAY)
            for s, i in calendar]  # fmt: skip
    if limits:
        made += [
            B.Budget(scope=B.BUDGET_SCOPE_PROJECT, limit_tokens=HUGE,
                     period=B.BUDGET_PERIOD_MINUTE),
            B.Budget(scope=B.BUDGET_SCOPE_MODEL, scope_id="gpt-4o", limit_requests=HUGE,
                     period=B.BUDGET_PERIOD_MINUTE),
            B.Budget(scope=B.BUDGET_SCOPE_THREAD, scope_id=f"{project}-t",
                     max_in_flight=100_000, period=B.BUDGET_PERIOD_DAY),
        ]  # fmt: skip
    for budget in made:
        await usage.CreateBudget(U.CreateBudgetRequest(project_id=project, budget=budget))


async def _round(usage: Any, project: str, tag: str) -> float:
    """Reservations per second of one round (each released afterwards, untimed)."""
    ids, thread = [f"{tag}-{n}" for n in range(PER_ROUND)], f"{project}-t"
    queue = iter(ids)

    async def client() -> None:
        for rid in queue:
            await usage.ReserveBudget(U.ReserveBudgetRequest(
                reservation_id=rid, thread_id=thread, tokens=200, model="gpt-4o"))  # fmt: skip

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - began
    release = usage.ReleaseReservation
    for start in range(0, PER_ROUND, 100):
        await asyncio.gather(*(
            release(U.ReleaseReservationRequest(thread_id=thread, reservation_id=r))
            for r in ids[start : start + 100]))  # fmt: skip
    return PER_ROUND / elapsed


async def _measure(running: stack.Stack) -> dict[str, Any]:
    async with (
        channel_to(running.addresses["agent"]) as agent_channel,
        channel_to(running.addresses["usage"]) as usage_channel,
    ):
        agents = agent_service_pb2_grpc.AgentServiceStub(agent_channel)
        usage = usage_service_pb2_grpc.UsageServiceStub(usage_channel)
        await _prepare(agents, usage, "cal", limits=False)
        await _prepare(agents, usage, "lim", limits=True)
        await _round(usage, "cal", "warm-cal")
        await _round(usage, "lim", "warm-lim")
        plain, limited = [], []
        for r in range(ROUNDS):
            plain.append(await _round(usage, "cal", f"cal-{r}"))
            limited.append(await _round(usage, "lim", f"lim-{r}"))
    calendar_rate, limits_rate = statistics.median(plain), statistics.median(limited)
    return {
        "calendar_only_reservations_per_s": calendar_rate,
        "with_three_limits_reservations_per_s": limits_rate,
        "limits_vs_calendar": limits_rate / calendar_rate,
    }


def reservation_limits() -> dict[str, Any]:
    with stack.running() as running:
        return asyncio.run(_measure(running))


if __name__ == "__main__":
    print(json.dumps(reservation_limits(), indent=2))
