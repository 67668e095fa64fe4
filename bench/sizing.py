"""`python -m bench.sizing`: Redis memory per agent, per thread and per message, measured
on a real redis-server with the services' own store code (deploy/README.md uses these
figures to size Redis for a fleet). Prints bytes per item, from used_memory before and
after writing N of each."""

from __future__ import annotations

import asyncio
import os

from redis.asyncio import Redis

from scripts.redis_server import RedisProcess
from services.agent_svc.store import AgentStore
from services.common.convert import new_id, now_ms
from services.common.redis import RedisClient, typed
from services.thread_svc.store import NewMessage, NewThread, ThreadStore
from services.usage_svc.store import UsageStore
from services.usage_svc.usage_types import UsageRecord

N = int(os.environ.get("SIZING_ITEMS", "20000"))
PAYLOAD = '{"text": "' + "x" * 200 + '"}'  # a short agent message (~215 bytes of JSON)


async def measure(redis: RedisClient) -> dict[str, float]:
    agents, threads = AgentStore(redis, 86_400), ThreadStore(redis, 86_400)
    usage = UsageStore(redis, 8, 86_400)
    now = str(now_ms())
    await agents.create_project({"id": "p", "display_name": "P", "owner": "o", "create_ms": now})

    async def used() -> int:
        return int((await redis.info("memory"))["used_memory"])

    async def each(count: int, make) -> float:
        before = await used()
        for start in range(0, count, 100):
            await asyncio.gather(*(make(i) for i in range(start, min(count, start + 100))))
        return (await used() - before) / count

    ids = [new_id() for _ in range(N)]

    async def agent(i: int) -> None:
        await agents.spawn({"id": ids[i], "project_id": "p", "agent_type_id": "worker",
                            "name": f"agent-{i}", "status": "IDLE", "create_ms": now,
                            "update_ms": now, "last_activity_ms": now,
                            "tasks_completed": "0", "peers": '["a", "b"]'}, "")  # fmt: skip

    async def thread(i: int) -> None:
        await usage.set_budget(f"t{i}", 100_000, "p", True)
        await threads.create_thread(NewThread(f"t{i}", "p", f"thread {i}", "", (ids[0], ids[1])))

    async def message(i: int) -> None:
        sender, to = (ids[0], ids[1]) if i % 2 else (ids[1], ids[0])
        await threads.post(
            NewMessage(new_id(), f"t{i % 1000}", sender, to, "text", PAYLOAD, True), None
        )

    async def record(i: int) -> None:
        # Ten agents, two models, one hour: what each further call adds.
        await usage.record_one(UsageRecord(
            f"u{i}", f"t{i % 1000}", ids[i % 10], "p", f"model-{i % 2}", 100, 20, 50, 300,
            False, "", f"f{i}"))  # fmt: skip

    per_agent = await each(N, agent)
    per_thread = await each(N, thread)
    for agent_id in ids[:2]:
        await threads.ensure_group("p", agent_id)
    per_message = await each(N, message)
    before = await used()
    for agent_id in ids[:2]:
        while got := await threads.deliveries("p", agent_id, "c", False, 1):
            await threads.ack("p", agent_id, [d.ack_id for d in got])
    acked = per_message - (before - await used()) / N
    per_record = await each(N, record)
    return {"agent": per_agent, "thread_with_budget": per_thread, "message": per_message,
            "message_acknowledged": acked,
            "usage_record": per_record}  # fmt: skip


def main() -> None:
    server = RedisProcess(log_file=None).start()
    try:

        async def run() -> dict[str, float]:
            redis = typed(Redis.from_url(server.url, decode_responses=True, max_connections=1000))
            try:
                return await measure(redis)
            finally:
                await redis.aclose()

        sizes = asyncio.run(run())
        for name, size in sizes.items():
            print(f"{name:>20}: {size:8.0f} bytes")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
