"""10,000 streams open through the model gateway (two replicas, real processes, a fake
provider process) and then dropped at once, as an unlucky fleet restart would: no
replica crashes, every upstream request is cancelled, each call is settled (as an
estimate: the provider never reported usage), each replica still serves, and its memory
does not grow past the storm's: a second storm reuses what the first freed (the
allocator keeps freed pages for reuse rather than returning them all to the system, so
RSS stays near its peak — measured and printed, with the memory an open stream costs)."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import httpx
import orjson
import pytest

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import api_key_pb2
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.e2e.test_budget_race import seeded_project, start
from tests.helpers import spawn, until
from tests.helpers.fake_provider import PROVIDER_KEY, providers_yaml
from tests.helpers.processes import ServiceProcess

STREAMS, REPLICAS = 10_000, 2


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def streams_that_fit() -> int:
    """10,000, unless this machine's open-file limit cannot hold them (the test process
    holds one socket per stream)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return min(STREAMS, hard - 2_000)


async def open_stream(port: int, token: str, n: int) -> asyncio.StreamWriter:
    """A raw HTTP/1.1 streaming call, read until its first event has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps({"model": "gpt-storm", "stream": True, "max_tokens": 1000,
                         "messages": [{"role": "user", "content": f"stream {n}"}]})  # fmt: skip
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {token}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    seen = b""
    while b"data:" not in seen:
        chunk = await reader.read(4096)
        assert chunk, seen
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return writer


@pytest.mark.timeout(300)
async def test_ten_thousand_open_streams_dropped_at_once(redis_url: str, tmp_path: Path) -> None:
    streams = streams_that_fit()
    agent_proc, agent_address, usages, addresses = await start(redis_url, 1)
    fake = ServiceProcess("tests.helpers.fake_provider", FAKE_PIECES="40", FAKE_DELAY_S="5")
    gateways: list[ServiceProcess] = []
    try:
        agents, usage = await seeded_project(agent_address, addresses[0], "storm")
        agent = await spawn(agents, "storm", project_id="storm")
        token = (await agents.CreateApiKey(
            A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id)
        )).token  # fmt: skip
        providers = tmp_path / "providers.yaml"
        fake_url = f"http://127.0.0.1:{fake.port()}"
        providers.write_text(
            providers_yaml(fake_url, "{connect: 5s, first_byte: 30s, between_events: 30s}")
        )
        gateways = [
            ServiceProcess(
                "gateway.models",
                REDIS_URL=redis_url,
                MODEL_HTTP_PORT="0",
                AGENT_SVC_ADDR=agent_address,
                USAGE_SVC_ADDR=addresses[0],
                MODEL_PROVIDERS_FILE=str(providers),
                FAKE_PROVIDER_KEY=PROVIDER_KEY,
                HTTP_MAX_CONNECTIONS="12000",
                LOG_RPC_RATE="10",
            )
            for _ in range(REPLICAS)
        ]
        ports = [g.port() for g in gateways]
        writers = [await open_stream(p, token, -1) for p in ports]  # warm: one each
        for writer in writers:
            writer.transport.abort()
        await asyncio.sleep(1)
        base = [rss_mb(g.process.pid) for g in gateways]

        opening = asyncio.Semaphore(1000)

        async def one(n: int) -> asyncio.StreamWriter:
            async with opening:
                return await open_stream(ports[n % REPLICAS], token, n)

        clock = asyncio.get_running_loop().time
        started = clock()
        writers = await asyncio.gather(*(one(n) for n in range(streams)))
        opened = clock()
        async with httpx.AsyncClient(base_url=fake_url) as http:
            assert (await http.get("/tally")).json()["open_streams"] == streams
            peak = [rss_mb(g.process.pid) for g in gateways]
            for writer in writers:  # all dropped at once
                writer.transport.abort()

            async def upstream_cancelled() -> bool:
                return (await http.get("/tally")).json()["open_streams"] == 0

            await until(upstream_cancelled, timeout=60)
            cancelled = clock()
        per_stream_kb = sum(p - b for p, b in zip(peak, base, strict=True)) * 1024 / streams
        print(f"\nmodel gateway: {per_stream_kb:.1f} KB per open stream "
              f"({streams} streams on {REPLICAS} replicas; RSS base {base}, peak {peak})")  # fmt: skip

        async def all_settled() -> bool:
            shown = await usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent.id))
            return shown.totals.request_count >= streams + REPLICAS

        await until(all_settled, timeout=120)
        print(f"opened in {opened - started:.1f} s, upstream cancelled {cancelled - opened:.1f} s "
              f"after the drop, all settled {clock() - cancelled:.1f} s later")  # fmt: skip
        shown = (await usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent.id))).totals
        assert shown.estimated_request_count == shown.request_count  # usage never reported
        for gateway in gateways:
            assert gateway.process.poll() is None, gateway.output()[-3000:]
        after = [rss_mb(g.process.pid) for g in gateways]
        # A second storm, a fifth the size: served from what the first freed (a leak of
        # what each stream takes would add ~48 MB a replica).
        writers = await asyncio.gather(*(one(n) for n in range(streams // 5)))
        for writer in writers:
            writer.transport.abort()
        again = [rss_mb(g.process.pid) for g in gateways]
        print(f"RSS after the drop {after} MB, after a second storm {again} MB")
        for high, second in zip(peak, again, strict=True):
            assert second <= high + 20, (peak, again)  # no growth: nothing leaked
        async with httpx.AsyncClient() as http:  # and each replica still serves
            for port in ports:
                answer = await http.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    headers={"authorization": f"Bearer {token}"},
                    json={"model": "echo-1", "messages": [{"role": "user", "content": "alive"}]},
                )  # fmt: skip
                assert answer.status_code == 200, answer.text
    finally:
        for process in [*gateways, fake, *usages, agent_proc]:
            process.stop()
