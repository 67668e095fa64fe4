"""The whole cluster as real processes: inject a message, receive it, account its usage."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile

import httpx
from google.protobuf import struct_pb2

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.thread.v1 import thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from services.common import registry
from tests.e2e.test_processes import start_service, wait_serving
from tests.helpers import ADMIN_TOKEN, authed_channel, make_project, make_type, spawn
from tests.helpers.processes import ServiceProcess

ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_inject_receive_and_account_across_real_processes(redis_url) -> None:
    # Each service needs the others' addresses before any starts: unix sockets in a
    # private folder (no port is picked that something else could take).
    folder = tempfile.mkdtemp(prefix="ap-")
    addresses = {s.name: f"unix:{folder}/{s.name}.sock" for s in registry.SERVICES}
    peers = {s.address_env: addresses[s.name] for s in registry.SERVICES}
    processes = [
        start_service(s.module, redis_url, GRPC_ADDRESS=addresses[s.name], **peers)
        for s in registry.SERVICES
    ]
    try:
        await asyncio.gather(*(wait_serving(address) for address in addresses.values()))
        channels = {n: authed_channel(a) for n, a in addresses.items()}
        agents = agent_service_pb2_grpc.AgentServiceStub(channels["agent"])
        threads = thread_service_pb2_grpc.ThreadServiceStub(channels["thread"])
        usage = usage_service_pb2_grpc.UsageServiceStub(channels["usage"])
        await make_project(agents)
        await make_type(agents)
        worker = await spawn(agents, "worker")

        inbox = threads.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=worker.id))
        body = struct_pb2.Struct()
        body.update({"task": "summarise the incident"})
        injected = await threads.InjectMessage(T.InjectMessageRequest(to=worker.id, payload=body))
        delivery = await asyncio.wait_for(inbox.read(), 10)
        assert delivery.message.id == injected.message_id
        assert delivery.message.payload["task"] == "summarise the incident"
        await threads.AckMessages(
            T.AckMessagesRequest(agent_id=worker.id, ack_ids=[delivery.ack_id])
        )
        inbox.cancel()

        await usage.RecordUsage(
            U.RecordUsageRequest(
                usage_id="call-1", thread_id=injected.thread_id, agent_id=worker.id,
                project_id="demo", model="gpt-4o", prompt_tokens=1200, completion_tokens=300,
                latency_ms=800,
            )
        )  # fmt: skip
        seen = await agents.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=worker.id))
        assert seen.tokens_used == 1500 and seen.cost_usd > 0
        overview = await agents.GetOverview(agent_service_pb2.GetOverviewRequest())
        assert overview.threads.active == 1 and overview.usage.total_tokens == 1500
        assert not overview.unavailable_sources
        for channel in channels.values():
            await channel.close()

        # The real gateway process in front of them.
        gateway = ServiceProcess("gateway", **peers)
        processes.append(gateway)
        http_port = gateway.port()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", headers=ADMIN_HEADERS
        ) as client:
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            organism = await client.get("/api/v1/organism")
            assert organism.status_code == 200 and organism.json()["usage"]["total_tokens"] == 1500
            agent = (await client.get(f"/api/v1/agents/{worker.id}")).json()
            assert agent["tokens_used"] == 1500 and agent["status"] == "idle"
    finally:
        for process in processes:
            process.stop()
