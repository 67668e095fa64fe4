"""Faults: lost replies, SCRIPT FLUSH, Redis restarts, and Redis killed mid-load."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
import redis as redis_sync

from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from scripts.redis_server import RedisProcess
from services.usage_svc.server import create_server
from tests.helpers import authed_channel
from tests.helpers.faults import LosingProxy
from tests.helpers.servers import make_settings
from tests.usage_svc.test_usage import record

pytestmark = pytest.mark.slow  # fault injection, fuzzing, manifests: left out of test-fast


@contextlib.asynccontextmanager
async def usage_service(redis_url: str):
    app, port = await create_server(make_settings("usage_svc", redis_url), "127.0.0.1:0")
    await app.start()
    channel = authed_channel(f"127.0.0.1:{port}")
    try:
        yield usage_service_pb2_grpc.UsageServiceStub(channel)
    finally:
        await channel.close()
        await app.stop(grace=0)


async def totals(stub):
    return (await stub.GetUsageOverview(U.GetUsageOverviewRequest())).totals


async def test_a_retry_after_a_lost_reply_counts_once(redis_server, redis_url) -> None:
    proxy = await LosingProxy(redis_server.port).start()
    try:
        async with usage_service(f"redis://127.0.0.1:{proxy.port}/0") as stub:
            await stub.SetThreadBudget(
                U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=10_000)
            )
            await stub.RecordUsage(record("warm-up"))
            proxy.armed = True
            # Redis applies the script, the reply is lost, redis-py reconnects and sends the
            # same EVALSHA again: the usage id makes the second run a no-op.
            answer = await stub.RecordUsage(record("lost-reply"), timeout=10)
            assert proxy.dropped == 1
            assert answer.budget.total_tokens == 300
            seen = await totals(stub)
            assert seen.request_count == 2 and seen.total_tokens == 300
    finally:
        await proxy.close()


async def test_script_flush_is_invisible(redis_url) -> None:
    async with usage_service(redis_url) as stub:
        await stub.SetThreadBudget(
            U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=1000)
        )
        await stub.RecordUsage(record("u1"))
        with redis_sync.Redis.from_url(redis_url) as client:
            client.script_flush()
        await stub.RecordUsage(record("u2"))
        await stub.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="r", thread_id="t1", tokens=10)
        )
        with redis_sync.Redis.from_url(redis_url) as client:
            client.script_flush()
        batch = await stub.RecordUsageBatch(
            U.RecordUsageBatchRequest(requests=[record(f"b{i}", thread=f"x{i}") for i in range(20)])
        )
        assert all(r.status.code == 0 for r in batch.results)
        assert (await totals(stub)).request_count == 22


async def test_redis_restart_is_invisible_and_keeps_data(tmp_path) -> None:
    redis = RedisProcess(
        data_dir=str(tmp_path), extra_args=["--appendonly", "yes", "--appendfsync", "always"]
    )
    redis.start()
    try:
        async with usage_service(redis.url) as stub:
            await stub.SetThreadBudget(
                U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=1000)
            )
            await stub.RecordUsage(record("before"))
            redis.stop()
            redis.start()
            # The pooled connections are dead and the script cache is empty: neither shows.
            after = await stub.RecordUsage(record("after"), timeout=5)
            assert after.budget.total_tokens == 300
            assert (await totals(stub)).request_count == 2
    finally:
        redis.stop()


async def test_kill_mid_load_with_appendfsync_always_loses_no_acknowledged_record(tmp_path) -> None:
    redis = RedisProcess(
        data_dir=str(tmp_path), extra_args=["--appendonly", "yes", "--appendfsync", "always"]
    )
    redis.start()
    acknowledged: list[str] = []
    attempted = 0
    try:
        async with usage_service(redis.url) as stub:

            async def writer(worker: int) -> None:
                nonlocal attempted
                for i in range(10_000):
                    usage_id = f"w{worker}-{i}"
                    attempted += 1
                    try:
                        await stub.RecordUsage(record(usage_id, thread=f"t{worker}"), timeout=2)
                    except grpc.aio.AioRpcError:
                        return
                    acknowledged.append(usage_id)

            workers = [asyncio.create_task(writer(w)) for w in range(8)]
            await asyncio.sleep(1.0)
            redis.stop(kill=True)  # SIGKILL mid-load
            await asyncio.wait_for(asyncio.gather(*workers), 20)
            assert len(acknowledged) > 50, "the load did not get going"

            redis.start()
            seen = await totals(stub)
            # Every acknowledged record survived; at most the in-flight ones were added too.
            assert len(acknowledged) <= seen.request_count <= attempted
            for usage_id in acknowledged[:: max(1, len(acknowledged) // 200)]:
                worker = usage_id.split("-")[0][1:]
                again = await stub.RecordUsage(record(usage_id, thread=f"t{worker}"))
                assert again.duplicate, usage_id
    finally:
        redis.stop()


async def test_a_record_whose_caller_gave_up_is_not_written(redis_url) -> None:
    """Group commit and deadlines: a record still queued when its caller's deadline passes
    is dropped, not written after the deadline."""
    from services.common.redis import create_redis
    from services.usage_svc.store import UsageStore
    from services.usage_svc.usage_types import UsageRecord

    settings = make_settings("usage_svc", redis_url)
    redis = create_redis(settings)
    store = UsageStore(redis, shards=4, usage_id_ttl_s=3600)
    first, late = (
        UsageRecord(
            usage_id=f"q{i}", thread_id="t1", agent_id="a1", project_id="demo", model="m",
            prompt_tokens=10, completion_tokens=5, cost_micros=1, latency_ms=1, unpriced=False,
            reservation_id="", fingerprint=f"q{i}",
        )
        for i in range(2)
    )  # fmt: skip
    release = asyncio.Event()
    real_record = store.record

    async def slow_record(records):
        await release.wait()
        return await real_record(records)

    store.record = slow_record  # hold the first batch in flight
    writing = asyncio.create_task(store.record_one(first))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):  # the second caller's deadline passes while queued
            await store.record_one(late)
    release.set()
    await writing
    overview = await store.overview("", 10)
    assert overview.totals.requests == 1  # only the first record was written
    await redis.aclose()


async def test_an_error_after_a_stall_means_outcome_unknown_and_the_retry_counts_once() -> None:
    """Redis stalls (SIGSTOP) under load: calls fail with DEADLINE_EXCEEDED or UNAVAILABLE,
    yet some of them reach Redis and are applied when it resumes. Such an error means
    "outcome unknown": retrying with the same usage_id answers `duplicate` for those that
    were applied, records those that were not, and every record counts exactly once."""
    import os
    import signal

    with RedisProcess() as redis:
        async with usage_service(redis.url) as stub:
            await stub.SetThreadBudget(
                U.SetThreadBudgetRequest(project_id="demo", thread_id="t1", max_tokens=10**9)
            )
            await stub.RecordUsage(record("warm-up"))
            os.kill(redis.process.pid, signal.SIGSTOP)
            try:
                calls = [
                    stub.RecordUsage(record(f"stalled-{i}"), timeout=0.5 + 0.1 * i)
                    for i in range(17)
                ]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
            failed = [i for i, o in enumerate(outcomes) if isinstance(o, grpc.aio.AioRpcError)]
            assert failed, "the stall should have failed some calls"
            for i in failed:
                assert outcomes[i].code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                )  # fmt: skip
            await asyncio.sleep(0.5)
            applied_early = (await totals(stub)).request_count - 1
            # The batch that was in flight when Redis stopped is applied when it resumes,
            # although its callers were told DEADLINE_EXCEEDED.
            assert applied_early >= 1
            duplicates = 0
            for i in range(17):
                answer = await stub.RecordUsage(record(f"stalled-{i}"), timeout=10)
                duplicates += answer.duplicate
            # Whatever was applied during the stall answers duplicate on retry ...
            assert duplicates == applied_early
            # ... and every record counts once.
            seen = await totals(stub)
            assert seen.request_count == 18 and seen.total_tokens == 18 * 150
