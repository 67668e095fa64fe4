"""The worker runtime against real services, with the agent's own token: every message
handled and acknowledged, a failure redelivered, WORKING/IDLE kept, nothing while PAUSED,
a clean stop."""

from __future__ import annotations

import asyncio
import collections

from google.protobuf import struct_pb2

from agentplane.agent.v1 import agent_pb2, api_key_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.worker import Worker
from tests.helpers import make_project, make_type, spawn, until
from tests.sdk.test_client import client_of


async def agent_with_token(cluster):  # type: ignore[no-untyped-def]
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agent = await spawn(cluster.agent, "worker")
    key = await cluster.agent.CreateApiKey(
        A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id)
    )
    return agent, key.token


async def inject(cluster, agent_id: str, n: int, thread_id: str = "") -> T.InjectMessageResponse:  # type: ignore[no-untyped-def]
    body = struct_pb2.Struct()
    body.update({"n": n})
    return await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=agent_id, payload=body, thread_id=thread_id)
    )


async def test_a_worker_handles_acks_redelivers_a_failure_and_keeps_its_status(cluster) -> None:
    agent, token = await agent_with_token(cluster)
    first = await inject(cluster, agent.id, 0)
    seen: collections.Counter[int] = collections.Counter()
    statuses: list[int] = []

    async def handle(message: thread_pb2.Message) -> None:
        n = int(message.payload["n"])
        seen[n] += 1
        got = await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=agent.id))
        statuses.append(got.status)
        await asyncio.sleep(0.01)
        if n == 7 and seen[n] == 1:
            raise RuntimeError("the model timed out")  # first delivery of one message fails

    client = client_of(cluster, token=token)
    worker = Worker(agent.id, handle, client=client, concurrency=3)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    for n in range(1, 20):
        await inject(cluster, agent.id, n, first.thread_id)
    await until(lambda: asyncio.sleep(0, worker.handled == 20), timeout=20)
    assert sorted(seen) == list(range(20)) and seen[7] == 2
    assert all(count == 1 for n, count in seen.items() if n != 7)
    assert set(statuses) == {agent_pb2.AGENT_STATUS_WORKING}  # WORKING while handling

    async def idle() -> bool:
        got = await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=agent.id))
        return got.status == agent_pb2.AGENT_STATUS_IDLE and got.tasks_completed >= 1

    await until(idle)

    # Paused: nothing is handled until it is resumed.
    await cluster.agent.PauseAgent(A.PauseAgentRequest(agent_id=agent.id))
    await asyncio.sleep(1.2)  # past the inbox's status check
    await inject(cluster, agent.id, 100, first.thread_id)
    await asyncio.sleep(1.5)
    assert 100 not in seen
    await cluster.agent.ResumeAgent(A.ResumeAgentRequest(agent_id=agent.id))
    await until(lambda: asyncio.sleep(0, 100 in seen), timeout=10)

    stop.set()
    await asyncio.wait_for(running, 10)  # stops cleanly
    await client.close()
    # Everything was acknowledged: a fresh stream of the same consumer gets nothing.
    again = client_of(cluster, token=token)
    stream = again.threads.ReceiveMessages(
        T.ReceiveMessagesRequest(agent_id=agent.id), metadata=again.metadata
    )
    assert await asyncio.wait_for(asyncio.shield(_first_or_none(stream)), 3) is None
    await again.close()


async def _first_or_none(stream) -> object:  # type: ignore[no-untyped-def]
    try:
        return await asyncio.wait_for(stream.read(), 1.5)
    except TimeoutError:
        stream.cancel()
        return None


async def test_a_message_that_always_fails_is_given_up_after_max_attempts(cluster, caplog) -> None:
    caplog.set_level("WARNING", logger="agentplane.worker")
    agent, token = await agent_with_token(cluster)
    sent = await inject(cluster, agent.id, 1)
    attempts = 0
    dead: list[str] = []

    async def handle(message: thread_pb2.Message) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("cannot parse")

    async def dead_letter(message: thread_pb2.Message, error: BaseException) -> None:
        dead.append(message.id)

    client = client_of(cluster, token=token)
    worker = Worker(agent.id, handle, client=client, max_attempts=3, dead_letter=dead_letter)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await until(lambda: asyncio.sleep(0, dead), timeout=15)
    assert attempts == 3 and dead == [sent.message_id] and worker.dead == 1
    # Each failure is logged with the exception's type and its traceback, not its text alone.
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info and r.exc_info[0] is ValueError for r in failures)
    assert (
        "ValueError: cannot parse" in failures[0].getMessage()
        and sent.message_id in failures[0].getMessage()
    )
    assert "raise ValueError" in caplog.text  # the traceback's lines
    stop.set()
    await asyncio.wait_for(running, 10)
    await client.close()
