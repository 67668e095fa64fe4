"""`make bench-redis`: one EVALSHA of the usage script, through each Redis client path.

The same call RecordUsage makes (the `record_usage` script, one record, its real keys),
32 calls in flight from one asyncio process with uvloop, against a real redis-server. For
each client: calls/s, and the client process's CPU time per call, which is what the usage
service pays (Redis's own work is the same for all). Figures in docs/performance.md.
Clients that are not installed are skipped (`make bench-redis` installs coredis and
valkey-glide for the comparison; the services need neither).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from scripts.redis_server import RedisProcess
from services.common.redis import create_redis
from services.common.resp import PipelinedRedis
from services.common.settings import Settings
from services.usage_svc.store import UsageStore
from services.usage_svc.thread_budgets import script as record_script

ROOT = Path(__file__).resolve().parent.parent
CALLS = int(os.environ.get("BENCH_REDIS_CALLS", "8000"))
IN_FLIGHT = 32
Call = Callable[[list[str], list[Any]], Awaitable[Any]]


def record_args(tag: str, n: int) -> list[Any]:
    field = f"fp{n}|{tag}-{n}|100|20|1500|300|0||agent-{n % 8}|gpt-4o|t{n % 200}|bench||0|0"
    return [int(time.time() * 1000), 86_400, 35 * 86_400, 400 * 86_400, field]


async def measure(name: str, call: Call, keys: list[str]) -> dict[str, float]:
    for n in range(200):  # warm up (and load the script where the client needs it)
        await call(keys, record_args(f"warm-{name}", n))
    next_n = 0

    async def lane() -> None:
        nonlocal next_n
        while next_n < CALLS:
            n, next_n = next_n, next_n + 1
            reply = await call(keys, record_args(name, n))
            assert reply[0][0] == "NEW", reply  # each call records a new usage id

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"calls_per_s": CALLS / wall, "client_cpu_us_per_call": cpu / CALLS * 1e6}


async def measure_pipelines(redis: Any, sha: str, keys: list[str]) -> dict[str, float]:
    """redis-py's own batching: the in-flight calls sent as one pipeline, one at a time."""
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, CALLS, IN_FLIGHT):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(CALLS, start + IN_FLIGHT)):
            pipe.evalsha(sha, len(keys), *keys, *record_args("pipeline", n))
        replies = await pipe.execute()
        assert all(reply[0][0] == "NEW" for reply in replies), replies[:1]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"calls_per_s": CALLS / wall, "client_cpu_us_per_call": cpu / CALLS * 1e6}


async def clients(url: str) -> dict[str, dict[str, float]]:
    settings = Settings.from_env("usage_svc", env={"REDIS_URL": url})
    redis = create_redis(settings)
    store = UsageStore(redis, shards=8, usage_id_ttl_s=86_400)
    script = record_script(redis, "record_usage")  # the redis-py Script the store used
    sha, source = script.sha, script.script
    partition = store.layout.partition("bench")
    keys = [partition.prefix, partition.shard.prefix]
    await redis.script_load(source)
    results: dict[str, dict[str, float]] = {}

    async def through_script(k: list[str], a: list[Any]) -> Any:
        return await script(keys=k, args=a)

    async def through_execute_command(k: list[str], a: list[Any]) -> Any:
        return await redis.execute_command("EVALSHA", sha, len(k), *k, *a)

    results["redis-py + hiredis, Script object (before)"] = await measure(
        "script", through_script, keys
    )
    results["redis-py + hiredis, execute_command"] = await measure(
        "execute", through_execute_command, keys
    )
    results["redis-py + hiredis, pipeline of 32 calls"] = await measure_pipelines(redis, sha, keys)
    pipelined = PipelinedRedis(url, 2.0)

    async def through_pipe(k: list[str], a: list[Any]) -> Any:
        return await pipelined.evalsha(sha, source, k, a)

    results["pipelined RESP connection, hiredis (services/common/resp.py)"] = await measure(
        "pipe", through_pipe, keys
    )
    await pipelined.aclose()
    await redis.aclose()
    try:
        import coredis

        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        other = coredis.Redis(host=host, port=int(port), decode_responses=True)

        async def through_coredis(k: list[str], a: list[Any]) -> Any:
            return await other.evalsha(sha, keys=k, args=a)

        async with other:
            results[f"coredis {coredis.__version__}"] = await measure(
                "coredis", through_coredis, keys
            )
    except ImportError:
        results["coredis"] = {"skipped": 1}
    try:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress

        host, port = url.removeprefix("redis://").split("/")[0].split(":")
        glide = await GlideClient.create(
            GlideClientConfiguration([NodeAddress(host, int(port))], request_timeout=2000)
        )

        async def through_glide(k: list[str], a: list[Any]) -> Any:
            reply = await glide.custom_command(["EVALSHA", sha, str(len(k)), *k, *map(str, a)])
            return _decoded(reply)

        results["valkey-glide (Rust core)"] = await measure("glide", through_glide, keys)
        await glide.close()
    except ImportError:
        results["valkey-glide"] = {"skipped": 1}
    return results


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def main() -> int:
    redis = RedisProcess(log_file=None).start()
    try:
        results = uvloop.run(clients(redis.url))
    finally:
        redis.stop()
    base = results["redis-py + hiredis, Script object (before)"]["client_cpu_us_per_call"]
    print(f"\none EVALSHA of record_usage.lua, {IN_FLIGHT} in flight, {CALLS} calls, one process")
    print(f"{'client':64} {'calls/s':>9} {'CPU us/call':>12} {'vs before':>10}")
    for name, figures in results.items():
        if "skipped" in figures:
            print(f"{name:64} {'not installed':>33}")
            continue
        cpu = figures["client_cpu_us_per_call"]
        print(f"{name:64} {figures['calls_per_s']:9.0f} {cpu:12.1f} {cpu / base:9.2f}x")
    (ROOT / "bench" / "redis_clients.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
