"""`make bench-churn`: bounded memory under churn (SPEC §10).

Starts a real redis-server and the three services as real processes with retention
shortened to seconds, then pushes ten messages through each of THREADS short threads
(create with a budget, ten posts between two peers, complete) from several client
processes. The services remove each ended thread — its messages, inbox entries, indexes
and budget — THREAD_RETENTION after it ended.

CHURN_VIA=grpc drives every step through the thread service's RPCs. On a small machine
that path runs at a few hundred messages a second (three RPC hops per post), so the
default, CHURN_VIA=store, writes threads and messages with the thread service's own store
code (the same Lua scripts, the same keys) from the load processes, and budgets through
the usage service's RPCs; removal is always the services' own, in their processes.

Redis `used_memory` is sampled as the load runs; the figure that matters is the end
(after the last removals) against the value after the first 10% of the messages (target:
at most 1.5 times). Writes bench/churn.json.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import redis as redis_sync
from google.protobuf import field_mask_pb2, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2_grpc, agent_type_pb2, project_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2, thread_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from bench import stack
from bench.load import channel as channel_to

ROOT = Path(__file__).resolve().parent.parent
THREADS = int(os.environ.get("CHURN_THREADS", "100000"))
PER_THREAD = int(os.environ.get("CHURN_MESSAGES_PER_THREAD", "10"))
WORKERS = int(os.environ.get("CHURN_WORKERS", "2"))
VIA = os.environ.get("CHURN_VIA", "store")
IN_FLIGHT = int(os.environ.get("CHURN_IN_FLIGHT", "24"))  # threads at once per worker
AGENTS = 20
RETENTION = os.environ.get("CHURN_RETENTION", "3s")
TARGET = 1.5


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


async def setup(agent_addr: str) -> list[str]:
    """A project with AGENTS agents, every one a peer of every other."""
    async with channel_to(agent_addr) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        await stub.CreateProject(
            A.CreateProjectRequest(
                project_id="churn", project=project_pb2.Project(display_name="Churn")
            )
        )
        await stub.CreateAgentType(
            A.CreateAgentTypeRequest(
                agent_type=agent_type_pb2.AgentType(
                    id="worker", display_name="Worker", is_active=True
                )
            )
        )
        ids = []
        for n in range(AGENTS):
            agent = await stub.SpawnAgent(
                A.SpawnAgentRequest(
                    project_id="churn", agent=agent_pb2.Agent(agent_type_id="worker", name=f"w{n}")
                )
            )
            ids.append(agent.id)
        for agent_id in ids:
            await stub.UpdateAgent(
                A.UpdateAgentRequest(
                    agent_id=agent_id,
                    agent=agent_pb2.Agent(peers=[i for i in ids if i != agent_id]),
                    update_mask=field_mask_pb2.FieldMask(paths=["peers"]),
                )
            )
        return ids  # fmt: skip


def worker(
    addresses: dict[str, str], redis_url: str, agents: list[str], first: int, count: int,
    done: Any,
) -> None:  # fmt: skip
    run = _worker if VIA == "grpc" else _store_worker
    asyncio.run(run(addresses, redis_url, agents, first, count, done))


def pair(agents: list[str], n: int) -> tuple[str, str]:
    a, b = agents[n % AGENTS], agents[(n * 7 + 1) % AGENTS]
    return (a, b) if a != b else (a, agents[(n + 1) % AGENTS])


async def lanes(first: int, count: int, one: Any) -> None:
    queue = iter(range(first, first + count))

    async def lane() -> None:
        for n in queue:
            await one(n)

    await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))


async def _store_worker(
    addresses: dict[str, str], redis_url: str, agents: list[str], first: int, count: int,
    done: Any,
) -> None:  # fmt: skip
    from redis.asyncio import Redis

    from agentplane.usage.v1 import usage_service_pb2 as U
    from agentplane.usage.v1 import usage_service_pb2_grpc
    from services.common.convert import new_id
    from services.common.redis import typed
    from services.thread_svc.store import NewMessage, NewThread, ThreadStore

    redis = typed(Redis.from_url(redis_url, decode_responses=True, max_connections=IN_FLIGHT * 2))
    store = ThreadStore(redis, request_ttl_s=86_400)
    payload = '{"text": "' + "x" * 200 + '"}'  # a typical short agent message
    async with channel_to(addresses["usage"]) as channel:
        usage = usage_service_pb2_grpc.UsageServiceStub(channel)

        async def one(n: int) -> None:
            a, b = pair(agents, n)
            thread_id = new_id()
            await usage.SetThreadBudget(U.SetThreadBudgetRequest(
                project_id="churn", thread_id=thread_id, max_tokens=1000))  # fmt: skip
            await store.create_thread(NewThread(thread_id, "churn", f"t{n}", "", (a, b)))
            for m in range(PER_THREAD):
                sender, to = (a, b) if m % 2 == 0 else (b, a)
                await store.post(
                    NewMessage(new_id(), thread_id, sender, to, "text", payload, True), None
                )
            await store.end_thread(thread_id, "COMPLETED", "")
            await usage.CloseThreadBudget(U.CloseThreadBudgetRequest(thread_id=thread_id))
            with done.get_lock():
                done.value += PER_THREAD

        await lanes(first, count, one)
    await redis.aclose()


async def _worker(
    addresses: dict[str, str], redis_url: str, agents: list[str], first: int, count: int,
    done: Any,
) -> None:  # fmt: skip
    body = struct_pb2.Struct()
    body.update({"text": "x" * 200})  # a typical short agent message
    async with channel_to(addresses["thread"]) as channel:
        stub = thread_service_pb2_grpc.ThreadServiceStub(channel)

        async def one(n: int) -> None:
            a, b = pair(agents, n)
            thread = await stub.CreateThread(
                T.CreateThreadRequest(
                    thread=thread_pb2.Thread(
                        project_id="churn", title=f"t{n}", participants=[a, b], max_tokens=1000
                    )
                )
            )
            for m in range(PER_THREAD):
                sender, to = (a, b) if m % 2 == 0 else (b, a)
                await stub.PostMessage(
                    T.PostMessageRequest(
                        thread_id=thread.id, from_agent=sender, to_agent=to, payload=body
                    )
                )
            await stub.CompleteThread(T.CompleteThreadRequest(thread_id=thread.id))
            with done.get_lock():
                done.value += PER_THREAD  # fmt: skip

        await lanes(first, count, one)


def main() -> int:
    env = {"THREAD_RETENTION": RETENTION, "AGENT_RETENTION": RETENTION,
           "RETENTION_SWEEP_INTERVAL": "0.5s"}  # fmt: skip
    with stack.running(env) as running:
        return churn(running)


Samples = list[tuple[float, int, int]]  # (seconds, messages done, used_memory)


def churn(running: stack.Stack) -> int:
    client = redis_sync.Redis.from_url(running.redis_url)
    try:
        agents = asyncio.run(setup(running.addresses["agent"]))
        began = time.monotonic()
        base = used_memory(client)
        samples, done = _load(running, client, agents, began)
        loaded_s = time.monotonic() - began
        at_load_end = used_memory(client)
        left = _wait_for_removals(client, samples, done, began, loaded_s)
        result = _result(client, samples, done, base, loaded_s, at_load_end, left)
        (ROOT / "bench" / "churn.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
        ok = result["end_over_10pct"] <= TARGET and done >= THREADS * PER_THREAD
        print(f"end / after 10%: {result['end_over_10pct']} (target ≤ {TARGET}) "
              f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
        return 0 if ok else 1
    finally:
        client.close()


def _load(running: stack.Stack, client: Any, agents: Any, began: float) -> tuple[Samples, int]:
    """The load processes, run to their end, with used_memory sampled every second."""
    total = THREADS * PER_THREAD
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Value("q", 0)
    per = THREADS // WORKERS
    procs = [
        ctx.Process(target=worker, args=(running.addresses, running.redis_url, agents, w * per,
                    per if w < WORKERS - 1 else THREADS - w * per, done))
        for w in range(WORKERS)
    ]  # fmt: skip
    for p in procs:
        p.start()
    samples: Samples = []
    next_mark = 0.0
    print(f"{'elapsed s':>9} {'messages':>10} {'used_memory MB':>15}")
    while any(p.is_alive() for p in procs):
        time.sleep(1.0)
        point = (time.monotonic() - began, done.value, used_memory(client))
        samples.append(point)
        if point[1] >= next_mark * total:
            print(f"{point[0]:9.0f} {point[1]:10,} {point[2] / 1e6:15.1f}", flush=True)
            next_mark += 0.05
    if any(p.exitcode for p in procs):
        raise RuntimeError("a load worker failed")
    return samples, int(done.value)


def _wait_for_removals(
    client: Any, samples: Samples, done: int, began: float, loaded_s: float
) -> int:
    """The last threads ended just now: wait for their retention and a sweep (at most
    two minutes); how many threads are left."""
    while True:
        time.sleep(1.0)
        samples.append((time.monotonic() - began, done, used_memory(client)))
        left = sum(1 for _ in client.scan_iter(match="ap:thread:{p:churn}:thread:*"))
        if left == 0 or time.monotonic() - began > loaded_s + 120:
            return left


def _result(
    client: Any, samples: Samples, done: int, base: int, loaded_s: float, at_load_end: int,
    left: int,
) -> dict[str, Any]:  # fmt: skip
    kinds: dict[str, int] = {}
    for key in client.scan_iter(count=1000):  # a diagnostic, after the run
        kind = re.sub(r"[0-9A-Z]{26}", "<id>", key.decode())
        kinds[kind] = kinds.get(kind, 0) + 1
    at_tenth = next(m for _, n, m in samples if n >= THREADS * PER_THREAD // 10)
    end = samples[-1][2]
    peak = max(m for _, _, m in samples)
    return {
        "via": VIA, "threads": THREADS, "messages": done, "retention": RETENTION,
        "load_seconds": round(loaded_s, 1),
        "messages_per_s": round(done / loaded_s),
        "used_memory_start_mb": round(base / 1e6, 2),
        "used_memory_at_10pct_mb": round(at_tenth / 1e6, 2),
        "used_memory_peak_mb": round(peak / 1e6, 2),
        "used_memory_when_load_ended_mb": round(at_load_end / 1e6, 2),
        "load_end_over_10pct": round(at_load_end / at_tenth, 3),
        "used_memory_end_mb": round(end / 1e6, 2),
        "end_over_10pct": round(end / at_tenth, 3), "target": TARGET,
        "threads_left": left, "keys_left": dict(sorted(kinds.items())),
        "samples": [(round(t, 1), n, m) for t, n, m in samples[:: max(1, len(samples) // 200)]],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
