"""Data that once disagreed with itself: a thread's budget in two places, filtered message
pages that came back short, a thread id taken by budgeting a thread that did not exist."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import expect_error, make_project, make_type, spawn
from tests.security.test_security import owner_key, tenant, world_of
from tests.thread_svc.test_inbox import text


async def test_a_threads_max_tokens_is_its_budget(cluster) -> None:
    await make_project(cluster.agent)
    thread = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo", max_tokens=1000))
    )
    assert thread.max_tokens == 1000
    await cluster.usage.SetThreadBudget(
        U.SetThreadBudgetRequest(thread_id=thread.id, max_tokens=3000)
    )
    got = await cluster.thread.GetThread(T.GetThreadRequest(thread_id=thread.id))
    assert got.thread.max_tokens == 3000
    listed = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo"))
    assert [t.max_tokens for t in listed.threads] == [3000]
    killed = await cluster.thread.KillThread(T.KillThreadRequest(thread_id=thread.id))
    assert killed.max_tokens == 3000


async def test_filtered_message_pages_are_full_and_counted_exactly(cluster) -> None:
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha, beta, gamma = [await spawn(cluster.agent, n) for n in ("alpha", "beta", "gamma")]
    await cluster.agent.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent_id=alpha.id,
            agent=agent_pb2.Agent(peers=[beta.id, gamma.id]),
            update_mask=field_mask_pb2.FieldMask(paths=["peers"]),
        )
    )
    thread = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo"))
    )
    to_gamma = []
    for i in range(12):
        recipient = gamma if i % 3 == 0 else beta
        posted = await cluster.thread.PostMessage(
            T.PostMessageRequest(
                thread_id=thread.id,
                from_agent=alpha.id,
                to_agent=recipient.id,
                payload=text(str(i)),
            )
        )
        if recipient is gamma:
            to_gamma.append(posted.id)
    seen, token = [], ""
    while True:
        page = await cluster.thread.ListMessages(
            T.ListMessagesRequest(
                thread_id=thread.id, agent=gamma.id, page_size=3, page_token=token
            )
        )
        assert page.total_size == 4
        assert len(page.messages) == (3 if not seen else 1)  # full pages, not filtered ones
        seen += [m.id for m in page.messages]
        token = page.next_page_token
        if not token:
            break
    assert seen == to_gamma  # oldest first, every one once
    everyone = await cluster.thread.ListMessages(
        T.ListMessagesRequest(thread_id=thread.id, agent=alpha.id, page_size=100)
    )
    assert everyone.total_size == 12 and len(everyone.messages) == 12
    # An unfiltered listing still counts the whole thread.
    whole = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id=thread.id))
    assert whole.total_size == 12


async def test_nobody_takes_a_thread_id_by_budgeting_a_missing_thread(cluster) -> None:
    await make_type(cluster.agent)
    alice = tenant(cluster, "alice", await owner_key(cluster, "alice"))
    bob = tenant(cluster, "bob", await owner_key(cluster, "bob"))
    await world_of(alice)
    await world_of(bob)
    await expect_error(
        alice.usage.SetThreadBudget(
            U.SetThreadBudgetRequest(
                thread_id="squatted", max_tokens=10, project_id="alice-project"
            )
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    made = await bob.thread.CreateThread(
        T.CreateThreadRequest(
            thread_id="squatted", thread=thread_pb2.Thread(project_id="bob-project")
        )
    )
    assert made.id == "squatted" and made.max_tokens == 100_000
    # An owner still changes the budget of a thread of theirs.
    changed = await bob.usage.SetThreadBudget(
        U.SetThreadBudgetRequest(thread_id="squatted", max_tokens=50, project_id="bob-project")
    )
    assert changed.max_tokens == 50
    # A thread id in use in another project is ALREADY_EXISTS, never a stray NOT_FOUND.
    await expect_error(
        alice.thread.CreateThread(
            T.CreateThreadRequest(
                thread_id="squatted", thread=thread_pb2.Thread(project_id="alice-project")
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    for who in (alice, bob):
        for channel in who.channels:
            await channel.close()
