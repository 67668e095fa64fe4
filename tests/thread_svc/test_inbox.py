"""Inbox delivery: at least once, in order, across restarts, paused agents, two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from agentplane.thread.v1 import thread_pb2, thread_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2 as T
from services.thread_svc.server import create_server as create_thread_server
from tests.helpers import authed_channel, expect_error, make_project, make_type, spawn
from tests.helpers.servers import make_settings, start_cluster, stop_cluster


def text(value: str) -> struct_pb2.Struct:
    data = struct_pb2.Struct()
    data.update({"text": value})
    return data


async def setup_pair(cluster):
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha = await spawn(cluster.agent, "alpha")
    beta = await spawn(cluster.agent, "beta")
    await cluster.agent.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent_id=alpha.id,
            agent=agent_pb2.Agent(peers=[beta.id]),
            update_mask=field_mask_pb2.FieldMask(paths=["peers"]),
        )
    )
    thread = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo"))
    )
    return alpha, beta, thread


async def send(cluster, thread, alpha, beta, *values: str) -> None:
    for value in values:
        await cluster.thread.PostMessage(
            T.PostMessageRequest(
                thread_id=thread.id, from_agent=alpha.id, to_agent=beta.id, payload=text(value)
            )
        )


_pending_reads: dict[int, asyncio.Task] = {}


async def _next(stream, timeout: float):
    """The stream's next item; a read that times out stays pending (and is reused), since
    cancelling a read would cancel the whole call."""
    task = _pending_reads.pop(id(stream), None) or asyncio.ensure_future(stream.read())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        _pending_reads[id(stream)] = task
        raise TimeoutError
    return task.result()


async def take(stream, count: int, timeout: float = 5.0) -> list[T.ReceiveMessagesResponse]:
    return [await _next(stream, timeout) for _ in range(count)]


async def nothing_arrives(stream, seconds: float = 1.5) -> None:
    with pytest.raises(TimeoutError):
        await _next(stream, seconds)


@pytest.fixture
async def pair(cluster):
    alpha, beta, thread = await setup_pair(cluster)
    return cluster, alpha, beta, thread


async def test_delivered_in_order_acked_once_unacked_again(pair) -> None:
    cluster, alpha, beta, thread = pair
    await send(cluster, thread, alpha, beta, "one", "two")
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    got = await take(stream, 2)
    await send(cluster, thread, alpha, beta, "three")
    got += await take(stream, 1)
    assert [g.message.payload["text"] for g in got] == ["one", "two", "three"]
    assert all(g.delivery_count == 1 for g in got) and got[0].message.thread_id == thread.id
    acked = await cluster.thread.AckMessages(
        T.AckMessagesRequest(agent_id=beta.id, ack_ids=[got[0].ack_id, got[1].ack_id])
    )
    assert acked.acked_count == 2
    stream.cancel()

    again = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    redelivered = await take(again, 1)
    assert redelivered[0].message.payload["text"] == "three" and redelivered[0].delivery_count == 2
    await cluster.thread.AckMessages(
        T.AckMessagesRequest(agent_id=beta.id, ack_ids=[redelivered[0].ack_id])
    )
    await nothing_arrives(again)
    again.cancel()


async def new_thread_replica(cluster, redis_url: str, redis_cluster: bool = False):
    """A fresh thread-service replica in place of the stopped one; a channel to it."""
    settings = make_settings(
        "thread_svc", redis_url, redis_cluster,
        agent_svc_addr=cluster.address("agent"), usage_svc_addr=cluster.address("usage"),
    )  # fmt: skip
    fresh, port = await create_thread_server(settings, "127.0.0.1:0")
    await fresh.start()
    cluster.apps["thread"] = fresh
    return authed_channel(f"127.0.0.1:{port}")


async def test_a_stopping_replica_ends_its_inbox_streams_at_once_and_frees_the_lease(
    redis_url,
) -> None:
    """A stream waiting in a blocking read ends as soon as its replica starts stopping (not
    when grpc cancels it at the end of the grace), giving its lease back while Redis is
    still there: a new replica serves the same consumer at once. (Seen: the lease left
    behind when the read outlasted a short grace, and the new replica refused with
    ABORTED for the lease's life.)"""
    cluster = await start_cluster(redis_url)
    try:
        alpha, beta, thread = await setup_pair(cluster)
        stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
        await send(cluster, thread, alpha, beta, "a")
        await take(stream, 1)  # the stream is now in its next blocking read (1 s)
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await cluster.apps["thread"].stop(grace=5)
        assert time.monotonic() - began < 0.5
        async with await new_thread_replica(cluster, redis_url) as channel:
            stub = thread_service_pb2_grpc.ThreadServiceStub(channel)
            resumed = stub.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
            (again,) = await take(resumed, 1)  # unacknowledged: delivered again
            assert again.delivery_count == 2
            resumed.cancel()
    finally:
        await stop_cluster(cluster)


async def test_inbox_survives_a_thread_service_restart(redis_target) -> None:
    cluster = await start_cluster(redis_target.url, redis_target.cluster)
    try:
        alpha, beta, thread = await setup_pair(cluster)
        await send(cluster, thread, alpha, beta, "a", "b", "c")
        stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
        got = await take(stream, 3)
        await cluster.thread.AckMessages(
            T.AckMessagesRequest(agent_id=beta.id, ack_ids=[got[0].ack_id])
        )
        old = cluster.apps["thread"]
        await old.stop(grace=1)  # the replica goes away; the stream ends with it
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await asyncio.wait_for(stream.read(), 5) is not grpc.aio.EOF:
                pass
        async with await new_thread_replica(
            cluster, redis_target.url, redis_target.cluster
        ) as channel:
            stub = thread_service_pb2_grpc.ThreadServiceStub(channel)
            resumed = stub.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
            back = await take(resumed, 2)
            assert [b.message.payload["text"] for b in back] == ["b", "c"]  # "a" was acked
            await nothing_arrives(resumed, 1.2)
            resumed.cancel()
    finally:
        await stop_cluster(cluster)


async def test_a_paused_agent_receives_nothing_until_resumed(pair) -> None:
    cluster, alpha, beta, thread = pair
    await cluster.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=beta.id))
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    await send(cluster, thread, alpha, beta, "waited")
    await nothing_arrives(stream, 1.5)
    await cluster.agent.ResumeAgent(agent_service_pb2.ResumeAgentRequest(agent_id=beta.id))
    (got,) = await take(stream, 1)
    assert got.message.payload["text"] == "waited"
    stream.cancel()


async def test_injected_messages_are_delivered(pair) -> None:
    cluster, _, beta, _ = pair
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    reply = await cluster.thread.InjectMessage(
        T.InjectMessageRequest(to=beta.id, payload=text("from ops"))
    )
    (got,) = await take(stream, 1)
    assert got.message.id == reply.message_id and got.message.from_agent == "operator"
    assert got.message.thread_id == reply.thread_id
    stream.cancel()


async def test_two_replicas_never_deliver_one_message_twice(redis_target) -> None:
    cluster = await start_cluster(redis_target.url, redis_target.cluster)
    second, port = await create_thread_server(
        make_settings(
            "thread_svc", redis_target.url, redis_target.cluster,
            agent_svc_addr=cluster.address("agent"), usage_svc_addr=cluster.address("usage"),
        ),
        "127.0.0.1:0",
    )  # fmt: skip
    await second.start()
    channel = authed_channel(f"127.0.0.1:{port}")
    try:
        alpha, beta, thread = await setup_pair(cluster)
        other = thread_service_pb2_grpc.ThreadServiceStub(channel)
        left = cluster.thread.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=beta.id, consumer="w1")
        )
        right = other.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id, consumer="w2"))
        # The same consumer name on another replica is refused while the first is live
        # (open: its initial metadata comes once it holds the consumer's lease).
        await asyncio.wait_for(left.initial_metadata(), 5)
        clash = other.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id, consumer="w1"))
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(clash.read(), 5)
        assert caught.value.code() == grpc.StatusCode.ABORTED
        await send(cluster, thread, alpha, beta, *[f"m{i}" for i in range(20)])
        seen: list[str] = []

        async def drain(stream) -> None:
            with contextlib.suppress(TimeoutError):
                while True:
                    item = await _next(stream, 1.5)
                    seen.append(item.message.payload["text"])

        await asyncio.gather(drain(left), drain(right))
        assert sorted(seen) == sorted(f"m{i}" for i in range(20))  # each exactly once
        left.cancel()
        right.cancel()
    finally:
        await channel.close()
        await second.stop(grace=0)
        await stop_cluster(cluster)


async def test_deliveries_of_a_vanished_consumer_move_on_after_the_idle_time(redis_url) -> None:
    cluster = await start_cluster(redis_url, inbox_claim_idle_s=0.5)
    try:
        alpha, beta, thread = await setup_pair(cluster)
        await send(cluster, thread, alpha, beta, "orphan")
        gone = cluster.thread.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=beta.id, consumer="gone")
        )
        (first,) = await take(gone, 1)
        gone.cancel()  # never acknowledged
        heir = cluster.thread.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=beta.id, consumer="heir")
        )
        (claimed,) = await take(heir, 1, timeout=8)
        # Counted as a redelivery (2, or 3 if the vanishing consumer's own loop had already
        # reclaimed it once before its stream's end reached the server).
        assert claimed.message.id == first.message.id and claimed.delivery_count >= 2
        heir.cancel()
    finally:
        await stop_cluster(cluster)


async def test_streams_end_cleanly_on_shutdown(pair) -> None:
    cluster, _, beta, thread = pair
    inbox = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    watch = cluster.thread.WatchThread(T.WatchThreadRequest(thread_id=thread.id))
    await asyncio.sleep(0.3)
    await cluster.apps["thread"].stop(grace=5)
    assert await asyncio.wait_for(inbox.read(), 5) is grpc.aio.EOF
    assert await inbox.code() == grpc.StatusCode.OK
    assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
    assert await watch.code() == grpc.StatusCode.OK


async def test_open_streams_never_starve_ordinary_calls(redis_url) -> None:
    """Blocking stream reads use their own connection pool: with the ordinary pool at 4
    connections, 12 open streams leave every unary call answering promptly."""
    cluster = await start_cluster(redis_url, redis_max_connections=4)
    try:
        alpha, beta, thread = await setup_pair(cluster)
        watchers = [
            cluster.thread.WatchThread(T.WatchThreadRequest(thread_id=thread.id)) for _ in range(12)
        ]
        await asyncio.sleep(0.5)
        for i in range(10):
            await asyncio.wait_for(send(cluster, thread, alpha, beta, f"m{i}"), 3)
            got = await asyncio.wait_for(
                cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id)), 3
            )
            assert got.thread.message_count == i + 1
        for watcher in watchers:
            assert (await take(watcher, 1))[0].message.payload["text"] == "m0"
            watcher.cancel()
    finally:
        await stop_cluster(cluster)


async def test_streams_cancelled_right_after_opening_give_their_leases_back(pair) -> None:
    """A caller that goes the moment its stream opens (the gateway's SSE clients do) frees
    its consumer name at once: seen before, 199 of 200 such streams kept looping and
    renewing their leases every second, so their names answered ABORTED for good."""
    cluster, _alpha, beta, _thread = pair
    for i in range(200):
        call = cluster.thread.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=beta.id, consumer=f"q{i}")
        )
        await call.initial_metadata()
        call.cancel()
    await asyncio.sleep(1.5)  # at most one blocking read (1 s) after its caller went
    again = [
        cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id, consumer=f"q{i}"))
        for i in range(200)
    ]
    await asyncio.wait([asyncio.ensure_future(c.initial_metadata()) for c in again], timeout=5)
    await asyncio.sleep(0.3)  # a refusal (ABORTED) ends its call right after its metadata
    busy = [
        i for i, c in enumerate(again) if c.done() and await c.code() == grpc.StatusCode.ABORTED
    ]
    for c in again:
        c.cancel()
    assert not busy, f"{len(busy)} consumer names still taken"


async def test_an_agent_answers_the_operator_into_the_thread_not_an_inbox(pair) -> None:
    cluster, alpha, beta, thread = pair
    body = text("the answer")
    posted = await cluster.thread.PostMessage(T.PostMessageRequest(
        thread_id=thread.id, from_agent=beta.id, to_agent="operator", payload=body))  # fmt: skip
    assert posted.to_agent == "operator" and posted.from_agent == beta.id
    listed = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id=thread.id))
    assert [(m.from_agent, m.to_agent) for m in listed.messages] == [(beta.id, "operator")]
    mine = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="-", agent=beta.id))
    assert [m.id for m in mine.messages] == [posted.id]
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=beta.id))
    await nothing_arrives(stream, 1.0)  # the sender's inbox stays empty
    stream.cancel()
    # Not a way around peers: another agent still needs to be a peer.
    await expect_error(
        cluster.thread.PostMessage(T.PostMessageRequest(
            thread_id=thread.id, from_agent=beta.id, to_agent=alpha.id, payload=body)),
        grpc.StatusCode.PERMISSION_DENIED, reason="NOT_A_PEER",
    )  # fmt: skip
