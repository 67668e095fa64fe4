"""The console's Overview with 1,000 agents and 100,000 thread budgets in Redis (§11):
how long from navigation until its API calls are answered and drawn, in the OS's
headless Chromium. A figure, not a timed test: `make bench` prints it and writes it to
bench/results.json (skipped, with a note, where no chromium/chromedriver is installed).

    python -m bench.console     # this phase alone
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
from typing import Any

from agentplane.agent.v1 import agent_pb2, agent_service_pb2_grpc, agent_type_pb2, project_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from bench import stack
from bench.load import BENCH_TOKEN
from bench.load import channel as channel_to

AGENTS = 1_000
BUDGETS = 100_000
LOADS = 7


async def populate(running: stack.Stack) -> None:
    from redis.asyncio import Redis

    from services.common.redis import typed
    from services.usage_svc.store import UsageStore

    async with channel_to(running.addresses["agent"]) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        await agents.CreateProject(
            A.CreateProjectRequest(
                project_id="fleet", project=project_pb2.Project(display_name="Fleet")
            )
        )
        await agents.CreateAgentType(A.CreateAgentTypeRequest(agent_type=agent_type_pb2.AgentType(
            id="worker", display_name="Worker", is_active=True)))  # fmt: skip
        for start in range(0, AGENTS, 50):
            await asyncio.gather(*(agents.SpawnAgent(A.SpawnAgentRequest(
                project_id="fleet", agent=agent_pb2.Agent(agent_type_id="worker", name=f"w{n}")))
                for n in range(start, start + 50)))  # fmt: skip
    # The budgets with the usage service's own store code (100,000 RPCs would take minutes
    # on a small machine and measure nothing the console depends on).
    redis = typed(Redis.from_url(running.redis_url, decode_responses=True, max_connections=300))
    usage = UsageStore(redis, 8, 86_400)
    for start in range(0, BUDGETS, 250):
        await asyncio.gather(*(usage.set_budget(f"thread-{n}", 100_000, "fleet", True)
                               for n in range(start, start + 250)))  # fmt: skip
    await redis.aclose()


def measure(url: str) -> dict[str, Any]:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,720"):  # fmt: skip
        options.add_argument(arg)
    service = webdriver.ChromeService(shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(url + "/ui/")
        driver.execute_script(
            "sessionStorage.setItem('agentplane.token', arguments[0]);", BENCH_TOKEN
        )
        timings = []
        for _ in range(LOADS):
            driver.get(url + "/ui/#/overview")
            # From the navigation's start until the Overview is drawn (its API calls answered).
            timings.append(
                driver.execute_async_script("""
                const done = arguments[arguments.length - 1];
                const check = () => document.getElementById('main').dataset.ready === '1'
                  ? done(performance.now()) : setTimeout(check, 5);
                check();""")
            )
        return {"agents": AGENTS, "thread_budgets": BUDGETS, "loads": LOADS,
                "p50_ms": round(statistics.median(timings), 1), "max_ms": round(max(timings), 1),
                "first_ms": round(timings[0], 1)}  # fmt: skip
    finally:
        driver.quit()


def overview_load() -> dict[str, Any]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return {"skipped": "no chromium/chromedriver on this machine"}
    with stack.running(gateway=True) as running:
        asyncio.run(populate(running))
        return measure(running.gateway_url)


if __name__ == "__main__":
    print(json.dumps(overview_load(), indent=1))
    sys.exit(0)
