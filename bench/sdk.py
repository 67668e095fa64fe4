"""The SDK's batched recording against one RecordUsage RPC per record, from the same client
process, against a real usage service (SPEC §13: at least 5x).

    python -m bench.sdk     # this phase alone; `make bench` runs it too
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from agentplane.client import AgentplaneClient
from agentplane.usage.v1 import usage_service_pb2 as U
from bench import stack
from bench.load import BENCH_TOKEN

BATCHED = 40_000
ONE_BY_ONE = 4_000
IN_FLIGHT = 32  # concurrent RecordUsage calls on the one-per-record path


def fields(n: int, tag: str) -> dict[str, Any]:
    return {"usage_id": f"{tag}-{n}", "thread_id": f"t{n % 64}", "agent_id": f"a{n % 16}",
            "project_id": "bench", "model": "gpt-4o", "prompt_tokens": 100,
            "completion_tokens": 20}  # fmt: skip


async def measure(addresses: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {f"{k}_addr": v for k, v in addresses.items()}
    async with AgentplaneClient(token=BENCH_TOKEN, **options) as client:
        began = time.perf_counter()
        queue = iter(range(ONE_BY_ONE))

        async def lane() -> None:
            for n in queue:
                await client.call(client.usage_service.RecordUsage,
                                  U.RecordUsageRequest(**fields(n, "single")))  # fmt: skip

        await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
        single = ONE_BY_ONE / (time.perf_counter() - began)
    async with AgentplaneClient(token=BENCH_TOKEN, **options) as client:
        began = time.perf_counter()
        for n in range(BATCHED):
            client.usage.record(**fields(n, "batched"))
            if n % 1000 == 999:
                await asyncio.sleep(0)  # let the batches leave as a real caller would
        await client.usage.close()
        batched = BATCHED / (time.perf_counter() - began)
        assert client.usage.sent == BATCHED and not client.usage.refused
    return {"one_rpc_per_record_per_s": round(single), "sdk_batched_per_s": round(batched),
            "ratio": round(batched / single, 1), "records_one_by_one": ONE_BY_ONE,
            "records_batched": BATCHED}  # fmt: skip


def sdk_batching() -> dict[str, Any]:
    with stack.running() as running:
        return asyncio.run(measure(running.addresses))


if __name__ == "__main__":
    print(json.dumps(sdk_batching(), indent=1))
    sys.exit(0)
