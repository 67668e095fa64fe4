"""Retention (SPEC §10) with the real services: an ended thread and a terminated agent are
removed with everything they left, checked by scanning Redis; what is still live is
untouched; lists and counts never show a removed item."""

from __future__ import annotations

import grpc
import pytest

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import make_project, make_type, spawn, until
from tests.helpers.leftovers import mentions, settled, ttl
from tests.helpers.servers import start_cluster, stop_cluster
from tests.thread_svc.test_threads import payload, post, set_peers

RETENTION = {"thread_retention_s": 1.0, "agent_retention_s": 1.0, "retention_sweep_s": 0.1}


@pytest.fixture
async def short_lived(redis_target):
    running = await start_cluster(redis_target.url, redis_target.cluster, **RETENTION)
    yield running
    await stop_cluster(running)


async def gone(call) -> bool:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


async def test_an_ended_thread_leaves_nothing_behind(short_lived, redis_target) -> None:
    cluster = short_lived
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha, beta = await spawn(cluster.agent, "alpha"), await spawn(cluster.agent, "beta")
    await set_peers(cluster.agent, alpha.id, [beta.id])
    await set_peers(cluster.agent, beta.id, [alpha.id])

    async def thread(thread_id: str) -> None:
        await cluster.thread.CreateThread(
            T.CreateThreadRequest(
                thread_id=thread_id,
                thread=thread_pb2.Thread(project_id="demo", participants=[alpha.id, beta.id]),
            )
        )

    await thread("doomed-thread")
    await thread("living-thread")
    ids = []
    for n in range(6):  # both ways, with request ids, and an operator's message
        sender, to = (alpha, beta) if n % 2 else (beta, alpha)
        for thread_id in ("doomed-thread", "living-thread"):
            sent = await cluster.thread.PostMessage(
                post(thread_id, sender.id, to.id, f"m{n}", request_id=f"{thread_id}-req-{n}")
            )
            if thread_id == "doomed-thread":
                ids.append(sent.id)
    injected = await cluster.thread.InjectMessage(
        T.InjectMessageRequest(
            to=alpha.id, thread_id="doomed-thread", payload=payload(text="op"), request_id="op-1"
        )
    )
    ids.append(injected.message_id)
    # One delivery of alpha's inbox read and left unacknowledged (pending in the group).
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=alpha.id))
    await stream.read()
    stream.cancel()
    await cluster.usage.RecordUsage(
        U.RecordUsageRequest(
            usage_id="doomed-usage", agent_id=alpha.id, thread_id="doomed-thread",
            model="gpt-4o", prompt_tokens=10, completion_tokens=5,
        )
    )  # fmt: skip
    await cluster.thread.CompleteThread(T.CompleteThreadRequest(thread_id="doomed-thread"))

    await until(
        lambda: gone(cluster.thread.GetThread(T.GetThreadRequest(thread_id="doomed-thread")))
    )
    await until(lambda: gone(cluster.usage.GetThreadBudget(
        U.GetThreadBudgetRequest(thread_id="doomed-thread"))))  # fmt: skip
    needles = ["doomed-thread", *ids]
    assert not await settled(redis_target.url, redis_target.cluster, needles)
    # What a client's retry needs stays until it expires by itself (IDEMPOTENCY_TTL): only
    # the usage id's idempotency key.
    expiring = mentions(redis_target.url, redis_target.cluster, needles)
    assert {k.rsplit(":", 2)[-2] for k in expiring} <= {"doomed-thread"}
    assert all(0 < ttl(redis_target.url, redis_target.cluster, k) for k in expiring)

    listed = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo"))
    assert [t.id for t in listed.threads] == ["living-thread"] and listed.total_size == 1
    overview = await cluster.agent.GetOverview(A.GetOverviewRequest())
    assert overview.threads.total == 1 and overview.threads.completed == 0
    living = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="living-thread"))
    assert living.total_size == 6 and len(living.messages) == 6
    across = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="-", agent=alpha.id))
    assert across.total_size == 6 and {m.thread_id for m in across.messages} == {"living-thread"}
    # The living thread's messages still reach alpha's inbox.
    stream = cluster.thread.ReceiveMessages(T.ReceiveMessagesRequest(agent_id=alpha.id))
    got = await stream.read()
    stream.cancel()
    assert got.message.thread_id == "living-thread"


async def test_a_terminated_agent_is_removed_and_no_count_shows_it(
    short_lived, redis_target
) -> None:
    cluster = short_lived
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    keep = await spawn(cluster.agent, "keeper")
    doomed = await spawn(cluster.agent, "doomed", request_id="spawn-doomed")
    await cluster.agent.TerminateAgent(A.TerminateAgentRequest(agent_id=doomed.id))

    await until(lambda: gone(cluster.agent.GetAgent(A.GetAgentRequest(agent_id=doomed.id))))
    listed = await cluster.agent.ListAgents(A.ListAgentsRequest(project_id="demo"))
    assert [a.id for a in listed.agents] == [keep.id] and listed.total_size == 1
    everywhere = await cluster.agent.ListAgents(A.ListAgentsRequest(project_id="-"))
    assert [a.id for a in everywhere.agents] == [keep.id] and everywhere.total_size == 1
    overview = await cluster.agent.GetOverview(A.GetOverviewRequest())
    assert overview.agents.total == 1 and overview.agents.terminated == 0
    metrics = await cluster.agent.GetProjectAgentMetrics(
        A.GetProjectAgentMetricsRequest(project_id="demo")
    )
    assert metrics.terminated_instances == 0 and metrics.total_instances == 1
    # Its name is free, its request id forgotten; only the status-event history (a bounded
    # stream) still names it.
    left = mentions(redis_target.url, redis_target.cluster, [doomed.id])
    assert all(k.endswith("events") or k.endswith("events:-") for k in left), left
    assert (await spawn(cluster.agent, "doomed")).id != doomed.id


async def test_two_thread_service_replicas_sweep_together(short_lived, redis_target) -> None:
    """A second thread-service replica on the same Redis: both sweep; every ended thread
    goes exactly once, nothing is left, and the active ones stay."""
    from services.thread_svc.server import create_server
    from tests.helpers.servers import make_settings

    cluster = short_lived
    folder = cluster.address("thread").removeprefix("unix:").rsplit("/", 1)[0]
    settings = make_settings(
        "thread_svc", redis_target.url, redis_target.cluster, **RETENTION,
        agent_svc_addr=cluster.address("agent"), usage_svc_addr=cluster.address("usage"),
        thread_svc_addr=cluster.address("thread"),
    )  # fmt: skip
    replica, _ = await create_server(settings, f"unix:{folder}/thread-2.sock")
    await replica.start()
    try:
        await make_project(cluster.agent)
        await make_type(cluster.agent)
        agents = [await spawn(cluster.agent, f"a{n}") for n in range(4)]
        ended, kept = [], []
        for n in range(24):
            sent = await cluster.thread.InjectMessage(
                T.InjectMessageRequest(to=agents[n % 4].id, payload=payload(n=n))
            )
            if n % 3:
                await cluster.thread.CompleteThread(
                    T.CompleteThreadRequest(thread_id=sent.thread_id)
                )
                ended.append(sent.thread_id)
            else:
                kept.append(sent.thread_id)

        async def all_gone() -> bool:
            listed = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo"))
            return listed.total_size == len(kept)

        await until(all_gone)
        listed = await cluster.thread.ListThreads(
            T.ListThreadsRequest(project_id="demo", page_size=100)
        )
        assert sorted(t.id for t in listed.threads) == sorted(kept)
        assert not await settled(redis_target.url, redis_target.cluster, ended)
    finally:
        await replica.stop(grace=0)
