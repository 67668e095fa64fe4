"""A worker keeps going through a restart of the thread service (a real process, stopped
and started again on the same port): no message is lost, and all end up acknowledged."""

from __future__ import annotations

import asyncio

from google.protobuf import struct_pb2

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import agent_service_pb2_grpc, api_key_pb2
from agentplane.client import AgentplaneClient
from agentplane.thread.v1 import thread_pb2, thread_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.worker import Worker
from scripts.redis_server import free_port
from services.agent_svc.server import create_server as create_agent_server
from services.usage_svc.server import create_server as create_usage_server
from tests.helpers import authed_channel, make_project, make_type, spawn, until
from tests.helpers.processes import ServiceProcess
from tests.helpers.servers import make_settings


async def test_a_thread_service_restart_loses_no_message(redis_url) -> None:
    usage, usage_port = await create_usage_server(
        make_settings("usage_svc", redis_url), "127.0.0.1:0"
    )
    await usage.start()
    thread_port = free_port()
    agent, agent_port = await create_agent_server(
        make_settings("agent_svc", redis_url, usage_svc_addr=f"127.0.0.1:{usage_port}",
                      thread_svc_addr=f"127.0.0.1:{thread_port}"), "127.0.0.1:0")  # fmt: skip
    await agent.start()
    env = {"REDIS_URL": redis_url, "GRPC_PORT": str(thread_port),
           "AGENT_SVC_ADDR": f"127.0.0.1:{agent_port}", "USAGE_SVC_ADDR": f"127.0.0.1:{usage_port}"}  # fmt: skip
    threads = ServiceProcess("services.thread_svc", **env)
    seen: set[str] = set()
    try:
        threads.port()
        async with authed_channel(f"127.0.0.1:{agent_port}") as channel:
            agents = agent_service_pb2_grpc.AgentServiceStub(channel)
            await make_project(agents)
            await make_type(agents)
            me = await spawn(agents, "steady")
            key = await agents.CreateApiKey(A.CreateApiKeyRequest(
                role=api_key_pb2.API_KEY_ROLE_AGENT, subject=me.id))  # fmt: skip

        async def handle(message: thread_pb2.Message) -> None:
            await asyncio.sleep(0.02)
            seen.add(message.id)

        client = AgentplaneClient(
            token=key.token, agent_addr=f"127.0.0.1:{agent_port}",
            thread_addr=f"127.0.0.1:{thread_port}", usage_addr=f"127.0.0.1:{usage_port}",
        )  # fmt: skip
        worker = Worker(me.id, handle, client=client, concurrency=2)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))

        async def inject(count: int) -> list[str]:
            body = struct_pb2.Struct()
            body.update({"text": "work"})
            async with authed_channel(f"127.0.0.1:{thread_port}") as channel:
                stub = thread_service_pb2_grpc.ThreadServiceStub(channel)
                return [(await stub.InjectMessage(T.InjectMessageRequest(to=me.id, payload=body))).message_id
                        for _ in range(count)]  # fmt: skip

        sent = await inject(10)
        await until(lambda: asyncio.sleep(0, len(seen) >= 3), timeout=15)
        assert threads.stop() == 0  # a clean restart: SIGTERM, exit 0
        threads = ServiceProcess("services.thread_svc", **env)
        threads.port()
        sent += await inject(10)
        await until(lambda: asyncio.sleep(0, seen >= set(sent)), timeout=30)
        stop.set()
        await asyncio.wait_for(running, 15)
        await client.close()
        async with AgentplaneClient(
            token=key.token, thread_addr=f"127.0.0.1:{thread_port}"
        ) as check:
            stream = check.threads.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=me.id),
                                                   metadata=check.metadata)  # fmt: skip
            try:
                leftover = await asyncio.wait_for(stream.read(), 2)
            except TimeoutError:
                leftover = None
            stream.cancel()
        assert leftover is None  # everything acknowledged
    finally:
        threads.stop()
        await agent.stop(grace=0)
        await usage.stop(grace=0)
