"""Hundreds of inbox streams cancelled at once while deliveries are pending must not crash
the thread service (it once died with SIGSEGV: the per-RPC log line read the RPC's
context after the stream had ended)."""

from __future__ import annotations

import asyncio

import redis as redis_sync
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.thread.v1 import thread_service_pb2_grpc
from services.agent_svc.server import create_server as create_agent_server
from services.thread_svc.store import Keys
from services.usage_svc.server import create_server as create_usage_server
from tests.helpers import authed_channel, make_project, make_type, spawn
from tests.helpers.processes import ServiceProcess
from tests.helpers.servers import make_settings

STREAMS = 400
MESSAGES = 200
ROUNDS = 5


async def test_hundreds_of_inbox_streams_cancelled_at_once_do_not_crash(redis_url) -> None:
    usage, usage_port = await create_usage_server(
        make_settings("usage_svc", redis_url), "127.0.0.1:0"
    )
    await usage.start()
    agent, agent_port = await create_agent_server(
        make_settings("agent_svc", redis_url, usage_svc_addr=f"127.0.0.1:{usage_port}"),
        "127.0.0.1:0",
    )
    await agent.start()
    thread_proc = ServiceProcess(
        "services.thread_svc",
        REDIS_URL=redis_url,
        AGENT_SVC_ADDR=f"127.0.0.1:{agent_port}",
        USAGE_SVC_ADDR=f"127.0.0.1:{usage_port}",
    )
    try:
        address = thread_proc.address
        async with (
            authed_channel(f"127.0.0.1:{agent_port}") as agent_channel,
            authed_channel(address) as channel,
        ):
            agents = agent_service_pb2_grpc.AgentServiceStub(agent_channel)
            await make_project(agents)
            await make_type(agents)
            worker = await spawn(agents, "worker")
            threads = thread_service_pb2_grpc.ThreadServiceStub(channel)
            body = struct_pb2.Struct()
            body.update({"task": "x" * 200})
            first = await threads.InjectMessage(T.InjectMessageRequest(to=worker.id, payload=body))
            for _ in range(MESSAGES - 1):
                await threads.InjectMessage(
                    T.InjectMessageRequest(to=worker.id, payload=body, thread_id=first.thread_id)
                )
            health = health_pb2_grpc.HealthStub(channel)
            for round_no in range(ROUNDS):
                streams = [
                    threads.ReceiveMessages(
                        T.ReceiveMessagesRequest(agent_id=worker.id, consumer=f"c{i}")
                    )
                    for i in range(STREAMS)
                ]
                # Let deliveries start flowing (none is acknowledged), then drop them all.
                reads = [asyncio.ensure_future(s.read()) for s in streams[::2]]
                await asyncio.wait(reads, timeout=0.2 + 0.3 * round_no)
                for stream in streams:
                    stream.cancel()
                for read in reads:
                    read.cancel()
                await asyncio.gather(*reads, return_exceptions=True)
                await asyncio.sleep(0.3)
                assert thread_proc.process.poll() is None, (
                    f"the thread service died in round {round_no} "
                    f"(exit {thread_proc.process.returncode}):\n"
                    + "\n".join(thread_proc.lines[-20:])
                )
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # Still answering real calls, and nothing lost: a message injected after the
            # storm is in the agent's inbox (delivered at least once: to a live consumer, or
            # — if a dropped stream's last read took it — again after the claim delay).
            fresh = await threads.InjectMessage(
                T.InjectMessageRequest(to=worker.id, payload=body, thread_id=first.thread_id)
            )
            got = await threads.GetThread(T.GetThreadRequest(thread_id=first.thread_id))
            assert got.thread.message_count == MESSAGES + 1
            assert got.messages[-1].id == fresh.message_id
            with redis_sync.Redis.from_url(redis_url, decode_responses=True) as client:
                inbox = f"{Keys(worker.project_id).inbox(worker.id)}"
                (entry,) = client.xrevrange(inbox, count=1)
            assert entry[1]["id"] == fresh.message_id
    finally:
        code = thread_proc.stop()
        await agent.stop(grace=0)
        await usage.stop(grace=0)
    assert code == 0, f"thread service exit code {code}"
