"""Upgrading data written by the version with one hash tag per service: the old stores
(kept in tests/fixtures/layout_v1) write agents, threads, messages and inbox state; the
upgrade command moves them; the new services then serve all of it, deliver what was
pending, and their retention removes what ended."""

from __future__ import annotations

import grpc

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_service_pb2 as T
from scripts import upgrade_layout
from services.common.convert import new_id, now_ms
from services.thread_svc.store import Keys
from tests.fixtures.layout_v1 import agent_store as old_agent
from tests.fixtures.layout_v1 import thread_store as old_thread
from tests.helpers import until
from tests.helpers.leftovers import client
from tests.helpers.servers import start_cluster, stop_cluster, store_clients

LIVE = ("IDLE", "WORKING", "WAITING", "PAUSED")


async def write_old_data(target) -> dict[str, str]:  # type: ignore[no-untyped-def]
    now = str(now_ms())
    async with store_clients("agent_svc", target) as (redis, streams):
        agents = old_agent.AgentStore(redis, 600, streams)
        threads = old_thread.ThreadStore(redis, 600, streams)
        await agents.create_project({"id": "demo", "display_name": "Demo", "owner": "admin",
                                     "create_ms": now})  # fmt: skip
        await agents.create_type({"id": "coder", "display_name": "Coder", "is_active": "1",
                                  "input_schema": '{"type": "object"}', "create_ms": now})  # fmt: skip
        ids = {name: new_id() for name in ("alpha", "beta", "gone")}
        for name in ids:
            peers = '["' + '", "'.join(i for n, i in ids.items() if n != name) + '"]'
            await agents.spawn({"id": ids[name], "project_id": "demo", "agent_type_id": "coder",
                                "name": name, "status": "IDLE", "create_ms": now,
                                "update_ms": now, "last_activity_ms": now,
                                "tasks_completed": "0", "peers": peers}, "")  # fmt: skip
        await agents.update(
            old_agent.AgentChange(ids["gone"], target_status="TERMINATED", allowed_from=LIVE,
                                  set_fields={"terminate_ms": now}), "demo",
        )  # fmt: skip
        a, b = ids["alpha"], ids["beta"]
        for thread_id in ("t-live", "t-ended"):
            await threads.create_thread(old_thread.NewThread(thread_id, "demo", "", "", (a, b)))
        for n in range(4):
            sender, to = (a, b) if n % 2 == 0 else (b, a)
            await threads.post(old_thread.NewMessage(
                new_id(), "t-live", sender, to, "text", f'{{"n": {n}}}', True), None)  # fmt: skip
        await threads.post(old_thread.NewMessage(
            new_id(), "t-ended", a, b, "text", '{"n": 9}', True), None)  # fmt: skip
        await threads.end_thread("t-ended", "COMPLETED", "")
        # beta was delivered both of its t-live messages and acknowledged the first one.
        await threads.ensure_group(b)
        got = await threads.deliveries(b, "c1", False, 100)
        assert len(got) == 3  # two from t-live, one from t-ended
        await threads.ack(b, [got[0].ack_id])
    return ids


async def test_old_layout_data_is_served_after_the_upgrade(redis_target) -> None:
    ids = await write_old_data(redis_target)
    args = ["--redis-url", redis_target.url] + (["--cluster"] if redis_target.cluster else [])
    assert upgrade_layout.main(args) == 0
    assert upgrade_layout.main(args) == 0  # again: nothing left to move, nothing broken

    r = client(redis_target.url, redis_target.cluster)
    old = [k for p in ("ap:agent:{a}:agent:*", "ap:agent:{a}:idx:*", "ap:thread:{t}:*")
           for k in r.scan_iter(match=p) if k != Keys.projects]  # fmt: skip
    r.close()
    assert old == []

    cluster = await start_cluster(
        redis_target.url, redis_target.cluster, thread_retention_s=3.0, agent_retention_s=3.0,
        retention_sweep_s=0.1,
    )  # fmt: skip
    try:
        alpha, beta = ids["alpha"], ids["beta"]
        agent = await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=alpha))
        assert agent.name == "alpha" and agent.project_id == "demo"
        live = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="t-live"))
        assert [m.payload["n"] for m in live.messages] == [0, 1, 2, 3] and live.total_size == 4
        mine = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id="-", agent=beta))
        assert mine.total_size == 5
        by_beta = await cluster.thread.ListThreads(T.ListThreadsRequest(agent=beta))
        assert {t.id for t in by_beta.threads} == {"t-live", "t-ended"}
        # The pending deliveries come again to their consumer; the acknowledged one is gone.
        stream = cluster.thread.ReceiveMessages(
            T.ReceiveMessagesRequest(agent_id=beta, consumer="c1")
        )
        again = [await stream.read(), await stream.read()]
        stream.cancel()
        assert [d.delivery_count for d in again] == [2, 2]
        assert {d.message.payload["n"] for d in again} == {2, 9}
        # New posts work in the moved thread and reach the moved inbox.
        await cluster.thread.PostMessage(T.PostMessageRequest(
            thread_id="t-live", from_agent=alpha, to_agent=beta))  # fmt: skip
        metrics = await cluster.agent.GetProjectAgentMetrics(
            A.GetProjectAgentMetricsRequest(project_id="demo")
        )
        assert metrics.idle_instances == 2

        async def removed() -> bool:
            try:
                await cluster.thread.GetThread(T.GetThreadRequest(thread_id="t-ended"))
                return False
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            overview = await cluster.agent.GetOverview(A.GetOverviewRequest())
            return overview.agents.total == 2 and overview.agents.terminated == 0

        await until(removed)
        overview = await cluster.agent.GetOverview(A.GetOverviewRequest())
        assert overview.agents.idle == 2 and overview.threads.total == 1
        # The ended thread's undelivered message left beta's inbox with it.
        r = client(redis_target.url, redis_target.cluster)
        inbox = [f for _, f in r.xrange(Keys("demo").inbox(beta))]
        r.close()
        assert "t-ended" not in {f["thread_id"] for f in inbox} and len(inbox) == 2
    finally:
        await stop_cluster(cluster)
