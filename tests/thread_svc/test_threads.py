"""Threads and messages with the real agent and usage services: rules, order, paging."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import expect_error, make_project, make_type, spawn


def payload(**values) -> struct_pb2.Struct:
    data = struct_pb2.Struct()
    data.update(values)
    return data


async def set_peers(stub, agent_id: str, peers: list[str]) -> None:
    await stub.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent_id=agent_id,
            agent=agent_pb2.Agent(peers=peers),
            update_mask=field_mask_pb2.FieldMask(paths=["peers"]),
        )
    )


@pytest.fixture
async def world(cluster):
    """A project with agents alpha ⇄ beta (peers), gamma (no peers), and a thread."""
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha = await spawn(cluster.agent, "alpha")
    beta = await spawn(cluster.agent, "beta")
    gamma = await spawn(cluster.agent, "gamma")
    await set_peers(cluster.agent, alpha.id, [beta.id])
    await set_peers(cluster.agent, beta.id, [alpha.id])
    thread = await cluster.thread.CreateThread(
        T.CreateThreadRequest(
            thread=thread_pb2.Thread(
                project_id="demo", title="t", participants=[alpha.id], max_tokens=500
            )
        )
    )
    return cluster, alpha, beta, gamma, thread


def post(
    thread_id: str, sender: str, recipient: str, text: str = "hi", **kw
) -> T.PostMessageRequest:
    return T.PostMessageRequest(
        thread_id=thread_id, from_agent=sender, to_agent=recipient, payload=payload(text=text), **kw
    )


async def test_create_thread_sets_its_budget(world) -> None:
    cluster, alpha, *_, thread = world
    assert thread.status == thread_pb2.THREAD_STATUS_ACTIVE and list(thread.participants) == [
        alpha.id
    ]
    budget = await cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id=thread.id))
    assert budget.max_tokens == 500
    default = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo"), thread_id="mine")
    )
    assert default.id == "mine"
    budget = await cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id="mine"))
    assert budget.max_tokens == 100_000
    await expect_error(
        cluster.thread.CreateThread(
            T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo"), thread_id="mine")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_error(
        cluster.thread.CreateThread(
            T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="ghost"))
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        cluster.thread.CreateThread(T.CreateThreadRequest(thread=thread_pb2.Thread())),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="thread.project_id",
    )
    await expect_error(
        cluster.thread.CreateThread(
            T.CreateThreadRequest(
                thread=thread_pb2.Thread(project_id="demo", participants=["ghost"])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="thread.participants",
    )


async def test_peer_and_status_rules(world) -> None:
    cluster, alpha, beta, gamma, thread = world
    sent = await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id))
    assert (
        sent.from_agent == alpha.id and sent.payload["text"] == "hi" and sent.payload_type == "text"
    )
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, gamma.id)),
        grpc.StatusCode.PERMISSION_DENIED,
        reason="NOT_A_PEER",
    )
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, "ghost")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        cluster.thread.PostMessage(post("nothread", alpha.id, beta.id)), grpc.StatusCode.NOT_FOUND
    )
    await cluster.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=alpha.id))
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="SENDER_NOT_ACTIVE",
    )
    # A paused recipient may still be written to; a terminated one may not.
    await cluster.agent.ResumeAgent(agent_service_pb2.ResumeAgentRequest(agent_id=alpha.id))
    await cluster.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=beta.id))
    await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id, "while paused"))
    await cluster.agent.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=beta.id))
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="RECIPIENT_TERMINATED",
    )
    got = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id))
    assert got.thread.message_count == 2 and set(got.thread.participants) == {alpha.id, beta.id}
    assert [m.payload["text"] for m in got.messages] == ["hi", "while paused"]


async def test_bad_input_writes_nothing(world) -> None:
    cluster, alpha, beta, _, thread = world
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id, "x" * 70_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="payload",
    )
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, "", beta.id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="from_agent",
    )
    await expect_error(
        cluster.thread.PostMessage(post("", alpha.id, beta.id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="thread_id",
    )
    await expect_error(
        cluster.thread.InjectMessage(T.InjectMessageRequest(to="ghost", payload=payload(a=1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="to",
    )
    got = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id))
    assert got.thread.message_count == 0
    listed = await cluster.thread.ListThreads(T.ListThreadsRequest())
    assert listed.total_size == 1  # no thread was created by the refused inject


async def test_messages_keep_order_and_page(world) -> None:
    cluster, alpha, beta, _, thread = world
    for i in range(23):
        sender, recipient = (alpha.id, beta.id) if i % 2 == 0 else (beta.id, alpha.id)
        await cluster.thread.PostMessage(post(thread.id, sender, recipient, f"m{i}"))
    seen, token = [], ""
    while True:
        page = await cluster.thread.ListMessages(
            T.ListMessagesRequest(thread_id=thread.id, page_size=5, page_token=token)
        )
        assert page.total_size == 23
        seen += [m.payload["text"] for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"m{i}" for i in range(23)]
    across = await cluster.thread.ListMessages(
        T.ListMessagesRequest(thread_id="-", agent=beta.id, page_size=100)
    )
    assert across.total_size == 23 and across.messages[0].payload["text"] == "m22"  # newest first
    await expect_error(
        cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="-")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent",
    )


async def test_post_and_inject_are_idempotent(world) -> None:
    cluster, alpha, beta, _, thread = world
    first = await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id, request_id="r1"))
    again = await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id, request_id="r1"))
    assert again.id == first.id
    injected = await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=beta.id, payload=payload(cmd="stop"), request_id="i1")
    )
    retried = await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=beta.id, payload=payload(cmd="stop"), request_id="i1")
    )
    assert (retried.thread_id, retried.message_id) == (injected.thread_id, injected.message_id)
    created = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=injected.thread_id))
    assert created.thread.project_id == "demo" and created.thread.message_count == 1
    assert created.messages[0].from_agent == "operator"
    into = await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=beta.id, payload=payload(x=1), thread_id=thread.id)
    )
    assert into.thread_id == thread.id
    got = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id))
    assert got.thread.message_count == 2


async def test_kill_closes_the_budget_and_the_thread(world) -> None:
    cluster, alpha, beta, _, thread = world
    await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id))
    killed = await cluster.thread.KillThread(
        T.KillThreadRequest(thread_id=thread.id, reason="runaway")
    )
    assert killed.status == thread_pb2.THREAD_STATUS_KILLED and killed.HasField("end_time")
    again = await cluster.thread.KillThread(T.KillThreadRequest(thread_id=thread.id))
    assert again.status == thread_pb2.THREAD_STATUS_KILLED
    await expect_error(
        cluster.usage.ReserveBudget(
            U.ReserveBudgetRequest(reservation_id="r", thread_id=thread.id, tokens=1)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="THREAD_CLOSED",
    )
    await expect_error(
        cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="THREAD_NOT_ACTIVE",
    )
    await expect_error(
        cluster.thread.CompleteThread(T.CompleteThreadRequest(thread_id=thread.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="THREAD_ENDED",
    )
    killed_list = await cluster.thread.ListThreads(
        T.ListThreadsRequest(status=thread_pb2.THREAD_STATUS_KILLED)
    )
    assert [t.id for t in killed_list.threads] == [thread.id]
    by_agent = await cluster.thread.ListThreads(
        T.ListThreadsRequest(agent=beta.id, status=thread_pb2.THREAD_STATUS_KILLED)
    )
    assert [t.id for t in by_agent.threads] == [thread.id]
    active = await cluster.thread.ListThreads(
        T.ListThreadsRequest(status=thread_pb2.THREAD_STATUS_ACTIVE)
    )
    assert active.total_size == 0
    overview = await cluster.agent.GetOverview(agent_service_pb2.GetOverviewRequest())
    assert overview.threads.killed == 1 and overview.threads.total == 1
    assert not overview.unavailable_sources


async def test_thread_listing_filters_and_pages(world) -> None:
    cluster, _, beta, _, first = world
    made = [first.id]
    for i in range(7):
        spec = thread_pb2.Thread(project_id="demo", participants=[beta.id] if i % 2 else [])
        made.append((await cluster.thread.CreateThread(T.CreateThreadRequest(thread=spec))).id)
    page1 = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo", page_size=5))
    page2 = await cluster.thread.ListThreads(
        T.ListThreadsRequest(project_id="demo", page_size=5, page_token=page1.next_page_token)
    )
    assert [t.id for t in [*page1.threads, *page2.threads]] == list(reversed(made))
    assert page1.total_size == 8 and page2.next_page_token == ""
    mine = await cluster.thread.ListThreads(T.ListThreadsRequest(agent=beta.id))
    assert mine.total_size == 3


async def test_watch_thread_streams_messages_and_the_end(world) -> None:
    cluster, alpha, beta, _, thread = world
    watchers = [
        cluster.thread.WatchThread(T.WatchThreadRequest(thread_id=thread.id)) for _ in range(2)
    ]
    await asyncio.sleep(0.3)
    await cluster.thread.PostMessage(post(thread.id, alpha.id, beta.id, "watched"))
    await cluster.thread.CompleteThread(T.CompleteThreadRequest(thread_id=thread.id))
    for watcher in watchers:
        first = await asyncio.wait_for(watcher.read(), 5)
        assert first.message.payload["text"] == "watched"
        second = await asyncio.wait_for(watcher.read(), 5)
        assert second.thread.status == thread_pb2.THREAD_STATUS_COMPLETED
        assert await asyncio.wait_for(watcher.read(), 5) is grpc.aio.EOF


async def test_a_peer_that_is_down_gives_unavailable_not_a_hang(redis_url) -> None:
    import time

    from tests.helpers.servers import start_cluster, stop_cluster

    cluster = await start_cluster(redis_url)
    try:
        await make_project(cluster.agent)
        await cluster.apps["agent"].stop(grace=0)
        started = time.monotonic()
        await expect_error(
            cluster.thread.CreateThread(
                T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo")), timeout=10
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert time.monotonic() - started < 5
    finally:
        await stop_cluster(cluster)
