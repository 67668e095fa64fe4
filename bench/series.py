"""The bench's time-series phase: GetUsageTimeSeries (30 daily buckets, grouped by model)
with 1,000 and with 1,000,000 records recorded — the read must cost the same (§13)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from google.protobuf import timestamp_pb2

from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U

MODELS = [f"model-{i}" for i in range(20)]
DAY_MS = 86_400_000


async def record(stub: Any, first: int, count: int, in_flight: int = 4) -> None:
    """`count` records in project "bench" (thread budgets of 'bench-t*'), 1,000 a batch."""

    async def one(start: int) -> None:
        await stub.RecordUsageBatch(U.RecordUsageBatchRequest(requests=[
            U.RecordUsageRequest(
                usage_id=f"series-{i}", thread_id=f"series-t{i % 500}", agent_id=f"a{i % 50}",
                project_id="bench", model=MODELS[i % len(MODELS)], prompt_tokens=100 + i % 7,
                completion_tokens=20, latency_ms=5)
            for i in range(start, min(first + count, start + 1000))
        ]))  # fmt: skip

    starts = list(range(first, first + count, 1000))
    for at in range(0, len(starts), in_flight):
        await asyncio.gather(*(one(s) for s in starts[at : at + in_flight]))


async def read_p50_ms(stub: Any, samples: int = 100) -> float:
    now_ms = int(time.time() * 1000)
    start = timestamp_pb2.Timestamp()
    start.FromMilliseconds((now_ms // DAY_MS - 29) * DAY_MS)
    request = U.GetUsageTimeSeriesRequest(
        project_id="bench", granularity=B.GRANULARITY_DAY, start_time=start,
        group_by=B.USAGE_GROUP_BY_MODEL,
    )  # fmt: skip
    timings = []
    for _ in range(samples):
        began = time.perf_counter()
        reply = await stub.GetUsageTimeSeries(request)
        timings.append((time.perf_counter() - began) * 1000)
    assert reply.buckets, "the series is empty"
    return statistics.median(timings)


async def series_growth(stub: Any, large: int) -> dict[str, float]:
    await stub.ResetUsage(U.ResetUsageRequest())
    await record(stub, 0, 1_000)
    small = await read_p50_ms(stub)
    await record(stub, 1_000, large - 1_000)
    big = await read_p50_ms(stub)
    return {"records_small": 1_000, "records_large": large, "p50_ms_small": small,
            "p50_ms_large": big, "growth": big / small}  # fmt: skip
