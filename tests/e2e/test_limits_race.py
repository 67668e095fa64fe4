"""Limits on two usage-service replicas (real processes, one Redis), 64 concurrent callers
spread over both: a 100-tokens-per-minute window admits at most 100 tokens, a
5-requests-per-minute one exactly 5, `max_in_flight = 4` never more than 4 open at once —
a release admits exactly one more, and a replica SIGKILLed with slots held frees them at
their expiry. Refusals carry a QuotaFailure and, for windows and slots, a RetryInfo. (A
peer proxy admitted 663 tokens against 100 per minute; one counted parallel requests per
worker, so the cap multiplied by the replicas.)"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from services.common.errors import details_of
from tests.e2e.test_budget_race import start
from tests.helpers import authed_channel, make_project

CALLERS = 64


async def reserve_all(stubs, prefix: str, tokens: int = 10, ttl_s: int = 600):  # type: ignore[no-untyped-def]
    """CALLERS concurrent reservations, alternating between the replicas: (admitted
    ids, refusal errors)."""

    async def one(i: int):  # type: ignore[no-untyped-def]
        try:
            await stubs[i % 2].ReserveBudget(U.ReserveBudgetRequest(
                reservation_id=f"{prefix}{i}", thread_id="t1", tokens=tokens,
                ttl=duration_pb2.Duration(seconds=ttl_s)))  # fmt: skip
            return f"{prefix}{i}", None
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            return None, exc

    done = await asyncio.gather(*(one(i) for i in range(CALLERS)))
    return [r for r, _ in done if r], [e for _, e in done if e]


async def test_limits_hold_across_two_replicas(redis_target) -> None:
    cluster = "true" if redis_target.cluster else "false"
    agent, _agent_address, usages, addresses = await start(
        redis_target.url, 2, REDIS_CLUSTER=cluster
    )
    try:
        stubs = [usage_service_pb2_grpc.UsageServiceStub(authed_channel(a)) for a in addresses]
        from agentplane.agent.v1 import agent_service_pb2_grpc

        await make_project(
            agent_service_pb2_grpc.AgentServiceStub(authed_channel(_agent_address)), "race"
        )
        await stubs[0].SetThreadBudget(
            U.SetThreadBudgetRequest(project_id="race", thread_id="t1", max_tokens=10**9)
        )

        async def budget(**kw) -> B.Budget:  # type: ignore[no-untyped-def]
            return await stubs[0].CreateBudget(U.CreateBudgetRequest(
                project_id="race", budget=B.Budget(scope=B.BUDGET_SCOPE_PROJECT, **kw)))  # fmt: skip

        async def drop(b: B.Budget) -> None:
            await stubs[0].DeleteBudget(
                U.DeleteBudgetRequest(project_id="race", budget_id=b.budget_id)
            )

        # Tokens per minute.
        tpm = await budget(limit_tokens=100, period=B.BUDGET_PERIOD_MINUTE)
        admitted, refusals = await reserve_all(stubs, "tpm")
        assert len(admitted) == 10  # 10 x 10 tokens
        details = details_of(refusals[0])
        quota = next(d for d in details if isinstance(d, error_details_pb2.QuotaFailure))
        assert [v.subject for v in quota.violations] == [f"budget:{tpm.budget_id}"]
        retry = next(d for d in details if isinstance(d, error_details_pb2.RetryInfo))
        assert 0 < retry.retry_delay.ToMilliseconds() <= 60_000
        shown = await stubs[1].GetBudget(
            U.GetBudgetRequest(project_id="race", budget_id=tpm.budget_id)
        )
        assert (shown.reserved_tokens, shown.used_requests) == (100, 10)
        await drop(tpm)

        # Requests per minute.
        rpm = await budget(limit_requests=5, period=B.BUDGET_PERIOD_MINUTE)
        admitted, _ = await reserve_all(stubs, "rpm")
        assert len(admitted) == 5
        await drop(rpm)

        # Calls in flight.
        slots = await budget(max_in_flight=4, period=B.BUDGET_PERIOD_DAY)
        busiest = 0

        async def sample() -> None:
            nonlocal busiest
            while True:
                got = await stubs[1].GetBudget(
                    U.GetBudgetRequest(project_id="race", budget_id=slots.budget_id)
                )
                busiest = max(busiest, got.in_flight)
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        admitted, refusals = await reserve_all(stubs, "par")
        assert len(admitted) == 4
        retry = next(
            d for d in details_of(refusals[0]) if isinstance(d, error_details_pb2.RetryInfo)
        )
        assert retry.retry_delay.ToMilliseconds() == 1000
        await stubs[0].ReleaseReservation(
            U.ReleaseReservationRequest(thread_id="t1", reservation_id=admitted[0])
        )
        again, _ = await reserve_all(stubs, "more")
        assert len(again) == 1  # one slot freed: exactly one more
        sampler.cancel()
        assert busiest <= 4

        # A replica dies holding slots: they free at their expiry.
        for held in [*admitted[1:], *again]:
            await stubs[0].ReleaseReservation(
                U.ReleaseReservationRequest(thread_id="t1", reservation_id=held)
            )
        short, _ = await reserve_all([stubs[1], stubs[1]], "dying", ttl_s=2)
        assert len(short) == 4
        os.kill(usages[1].process.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while True:
                got = await stubs[0].GetBudget(
                    U.GetBudgetRequest(project_id="race", budget_id=slots.budget_id)
                )
                if got.in_flight == 0:
                    break
                await asyncio.sleep(0.2)
        alive, _ = await reserve_all([stubs[0], stubs[0]], "after")
        assert len(alive) == 4
    finally:
        for p in [*usages, agent]:
            p.stop()
