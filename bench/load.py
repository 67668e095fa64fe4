"""Load-generating workers: separate processes, each an asyncio loop with many calls in
flight, sending pre-encoded requests so the client is not the bottleneck."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplane.usage.v1 import usage_service_pb2 as U

RECORD = "/agentplane.usage.v1.UsageService/RecordUsage"
RESERVE = "/agentplane.usage.v1.UsageService/ReserveBudget"
CHECK = "/grpc.health.v1.Health/Check"
THREADS = 200
BENCH_TOKEN = "bench-superuser-token-0123456789"
METADATA = (("authorization", f"Bearer {BENCH_TOKEN}"),)


class _Bearer(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*METADATA),
            details.credentials, details.wait_for_ready,
        )  # fmt: skip
        return await continuation(details, request)


def channel(target: str) -> grpc.aio.Channel:
    """A channel whose unary calls carry the bench's superuser token."""
    return grpc.aio.insecure_channel(target, interceptors=[_Bearer()])


@dataclass
class WorkerResult:
    completed: int
    errors: int
    elapsed_s: float
    latencies_ms: list[float]
    server_cpu_s: tuple[float, float] = (0.0, 0.0)  # the server's CPU time at start and end


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _field(number: int, text: str) -> bytes:
    """Protobuf wire encoding of one short string field (fields may come in any order)."""
    data = text.encode()
    return bytes([(number << 3) | 2, len(data)]) + data


async def items_per_second(
    one: Callable[[int], Awaitable[int]], batches: int, in_flight: int
) -> float:
    """Calls `one(0..batches-1)`, `in_flight` at a time; the items they report, per second."""
    began = time.perf_counter()
    done = 0
    for start in range(0, batches, in_flight):
        done += sum(
            await asyncio.gather(*(one(b) for b in range(start, min(batches, start + in_flight))))
        )
    return done / (time.perf_counter() - began)


def thread_of(worker: int, n: int) -> str:
    return f"bench-t{(worker * 7919 + n) % THREADS}"


@dataclass(frozen=True)
class Caller:
    """Who the load calls as, and the agents its records name."""

    token: str = BENCH_TOKEN
    agents: tuple[str, ...] = tuple(f"agent-{i}" for i in range(8))


def record_body(worker: int, n: int, tag: str, agent: str) -> bytes:
    fixed = U.RecordUsageRequest(
        agent_id=agent, project_id="bench", model="gpt-4o",
        prompt_tokens=120, completion_tokens=80, latency_ms=350,
    ).SerializeToString()  # fmt: skip
    key = f"{tag}-{worker}-{n}"
    return fixed + _field(1, key) + _field(2, thread_of(worker, n)) + _field(10, key)


async def _run(
    target: str, kind: str, worker: int, count: int, concurrency: int, rate: float, tag: str,
    caller: Caller, server_pid: int = 0,
) -> WorkerResult:  # fmt: skip
    metadata = (("authorization", f"Bearer {caller.token}"),)
    agent = caller.agents[worker % len(caller.agents)]
    async with grpc.aio.insecure_channel(target) as raw:
        method = raw.unary_unary(CHECK if kind == "check" else RECORD)
        if kind == "check":
            body = health_pb2.HealthCheckRequest().SerializeToString()
            bodies = [body] * count
        else:
            bodies = [record_body(worker, n, tag, agent) for n in range(count)]
            reserve = raw.unary_unary(RESERVE)
            ttl = duration_pb2.Duration(seconds=600)

            async def hold(n: int) -> None:
                key = f"{tag}-{worker}-{n}"
                request = U.ReserveBudgetRequest(
                    reservation_id=key,
                    thread_id=thread_of(worker, n),
                    tokens=200,
                    ttl=ttl,
                    agent_id=agent,
                    model="gpt-4o",
                )
                await reserve(request.SerializeToString(), metadata=metadata)

            for start in range(0, count, 256):  # the reservations the records settle (untimed)
                await asyncio.gather(*(hold(n) for n in range(start, min(count, start + 256))))
        latencies: list[float] = []
        errors = 0
        next_index = 0
        began = time.perf_counter()
        cpu_before = process_cpu_s(server_pid) if server_pid else 0.0

        async def client() -> None:
            nonlocal next_index, errors
            while next_index < count:
                n = next_index
                next_index += 1
                if rate:
                    delay = began + n / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                sent = time.perf_counter()
                try:
                    await method(bodies[n], metadata=metadata)
                    latencies.append((time.perf_counter() - sent) * 1000)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        cpu_after = process_cpu_s(server_pid) if server_pid else 0.0
        return WorkerResult(len(latencies), errors, elapsed, latencies, (cpu_before, cpu_after))


def run_worker(
    target: str, kind: str, worker: int, count: int, concurrency: int, rate: float, tag: str,
    caller: Caller, server_pid: int = 0,
) -> WorkerResult:  # fmt: skip
    return asyncio.run(
        _run(target, kind, worker, count, concurrency, rate, tag, caller, server_pid)
    )


async def wait_serving(target: str) -> None:
    """Until the gRPC server at `target` answers its health check SERVING."""
    async with channel(target) as opened:
        for _ in range(200):
            try:
                reply = await health_pb2_grpc.HealthStub(opened).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("usage service did not start")
