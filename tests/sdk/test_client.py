"""The SDK's async client against real services: the budget guard, batched recording, and
retries that never count twice."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from agentplane.client import AgentplaneClient, BudgetExhausted, Retry
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, make_project
from tests.helpers.processes import ServiceProcess


def client_of(cluster, token: str = ADMIN_TOKEN, **options) -> AgentplaneClient:  # type: ignore[no-untyped-def]
    return AgentplaneClient(
        token=token, agent_addr=cluster.address("agent"),
        thread_addr=cluster.address("thread"), usage_addr=cluster.address("usage"), **options,
    )  # fmt: skip


async def test_the_budget_guard_settles_once_releases_on_error_and_refuses_over_budget(
    cluster,
) -> None:
    await make_project(cluster.agent)
    await cluster.usage.SetThreadBudget(
        U.SetThreadBudgetRequest(project_id="demo", thread_id="t", max_tokens=1000)
    )
    budget = lambda: cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="t"))  # noqa: E731
    async with client_of(cluster) as client:
        async with client.budget.guard("t", tokens=400, model="gpt-4o", agent_id="a1") as guard:
            assert (await budget()).reserved_tokens == 400  # held during the call
            guard.record(prompt_tokens=100, completion_tokens=50)
        assert guard.result is not None and not guard.result.duplicate and guard.result.cost_micros
        state = await budget()
        assert (state.total_tokens, state.reserved_tokens) == (150, 0)

        with pytest.raises(RuntimeError):
            async with client.budget.guard("t", tokens=300, model="gpt-4o", agent_id="a1"):
                raise RuntimeError("the model call failed")
        state = await budget()
        assert (state.total_tokens, state.reserved_tokens) == (150, 0)  # released, nothing counted

        with pytest.raises(BudgetExhausted) as refused:
            async with client.budget.guard("t", tokens=5000, model="gpt-4o", agent_id="a1"):
                pytest.fail("a refused reservation must not run the block")
        assert refused.value.subjects == ["thread:t"]
        state = await budget()
        assert (state.total_tokens, state.reserved_tokens) == (150, 0)


async def test_five_thousand_buffered_records_are_counted_exactly(cluster) -> None:
    async with client_of(cluster, batch_size=400) as client:
        ids = {
            client.usage.record(
                agent_id=f"a{n % 7}",
                thread_id=f"t{n % 5}",
                project_id="p",
                model="gpt-4o",
                prompt_tokens=10,
                completion_tokens=n % 3,
            )
            for n in range(5000)
        }
        await asyncio.sleep(0)  # some batches leave while others are still being filled
    assert not client.usage.refused, client.usage.refused[:2]
    assert len(ids) == 5000 and client.usage.sent == 5000
    totals = (await cluster.usage.GetUsageOverview(U.GetUsageOverviewRequest())).totals
    assert totals.request_count == 5000
    assert totals.total_tokens == 5000 * 10 + sum(n % 3 for n in range(5000))


async def test_a_stalled_usage_service_delays_records_but_counts_each_once(redis_url) -> None:
    usage = ServiceProcess("services.usage_svc", REDIS_URL=redis_url)
    try:
        address = usage.address
        retry = Retry(attempts=20, base_s=0.05, max_s=0.3, timeout_s=0.5)
        async with AgentplaneClient(token=ADMIN_TOKEN, usage_addr=address, retry=retry,
                                    batch_size=100) as client:  # fmt: skip
            for n in range(1500):
                client.usage.record(agent_id="a", thread_id="t", project_id="p", model="m", prompt_tokens=1,
                                    usage_id=f"u{n}")  # fmt: skip
                if n == 500:
                    await client.usage.flush()
                    os.kill(usage.process.pid, signal.SIGSTOP)  # mid-stream: calls hang
                    asyncio.get_running_loop().call_later(
                        2.0, os.kill, usage.process.pid, signal.SIGCONT
                    )
                    sending = asyncio.ensure_future(client.usage.flush())
                if n % 100 == 0:
                    await asyncio.sleep(0)
            await sending
        async with AgentplaneClient(token=ADMIN_TOKEN, usage_addr=address) as check:
            overview = await check.call(check.usage_service.GetUsageOverview,
                                        U.GetUsageOverviewRequest())  # fmt: skip
        assert overview.totals.request_count == 1500  # every record once, none twice
    finally:
        os.kill(usage.process.pid, signal.SIGCONT)
        usage.stop()


async def test_errors_that_a_retry_cannot_fix_are_raised_at_once(cluster) -> None:
    async with client_of(cluster, retry=Retry(attempts=5)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call(client.usage_service.GetThreadBudget,
                              U.GetThreadBudgetRequest(thread_id="nope"))  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    async with AgentplaneClient(
        token="wrong-token-0123456789", usage_addr=cluster.address("usage")
    ) as bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bad.call(bad.usage_service.GetUsageOverview, U.GetUsageOverviewRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_every_write_that_takes_a_key_gets_one_and_keeps_it_across_retries(cluster) -> None:
    from agentplane.thread.v1 import thread_service_pb2 as T
    from tests.helpers import make_type, spawn

    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agent = await spawn(cluster.agent, "alpha")
    async with client_of(cluster) as client:
        request = T.InjectMessageRequest(to=agent.id)
        request.payload.update({"text": "once"})
        first = await client.call(client.threads.InjectMessage, request)
        assert request.request_id  # made by the client
        again = await client.call(client.threads.InjectMessage, request)  # a retry of it
        assert again.message_id == first.message_id
    listed = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id=first.thread_id))
    assert listed.total_size == 1  # one message, whatever the retries
