"""Input that protobuf accepts but the API must not: each is INVALID_ARGUMENT naming the
field, and nothing is written (these once answered INTERNAL, UNKNOWN, or were accepted)."""

from __future__ import annotations

import base64
import math

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import expect_error, make_project, make_type, spawn


def nested_token(depth: int = 100_000) -> str:
    return base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode().rstrip("=")


@pytest.fixture
async def world(cluster):
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    worker = await spawn(cluster.agent, "worker")
    return cluster, worker


async def test_a_deeply_nested_page_token_is_invalid_argument(world) -> None:
    cluster, _ = world
    for token in (nested_token(), nested_token(3000)):
        await expect_error(
            cluster.agent.ListAgents(
                agent_service_pb2.ListAgentsRequest(project_id="demo", page_token=token)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="page_token",
        )
        await expect_error(
            cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo", page_token=token)),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="page_token",
        )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_non_finite_numbers_in_structs_are_refused_and_write_nothing(world, bad) -> None:
    cluster, worker = world
    payload = struct_pb2.Struct()
    payload.update({"ok": 1, "deep": {"list": [1, {"x": bad}]}})
    await expect_error(
        cluster.thread.InjectMessage(T.InjectMessageRequest(to=worker.id, payload=payload)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="payload.deep.list[1].x",
    )
    await expect_error(
        cluster.thread.CreateThread(
            T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo", metadata=payload))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="thread.metadata.deep.list[1].x",
    )
    memory = struct_pb2.Struct()
    memory.update({"score": bad})
    await expect_error(
        cluster.agent.SpawnAgent(
            agent_service_pb2.SpawnAgentRequest(
                project_id="demo",
                agent=agent_pb2.Agent(agent_type_id="coder", name="nan", short_term_memory=memory),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent.short_term_memory.score",
    )
    threads = await cluster.thread.ListThreads(T.ListThreadsRequest(project_id="demo"))
    agents = await cluster.agent.ListAgents(agent_service_pb2.ListAgentsRequest(project_id="demo"))
    assert threads.total_size == 0 and [a.name for a in agents.agents] == ["worker"]


async def test_bytes_that_are_not_protobuf_are_invalid_argument(world) -> None:
    cluster, _ = world
    channel = cluster.channels[0]
    raw = channel.unary_unary(
        "/agentplane.agent.v1.AgentService/CreateProject",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12" * 50):
        await expect_error(raw(garbage), grpc.StatusCode.INVALID_ARGUMENT, field="request")
    projects = await cluster.agent.ListProjects(agent_service_pb2.ListProjectsRequest())
    assert [p.id for p in projects.projects] == ["demo"]


async def test_an_undefined_enum_value_is_invalid_argument(world) -> None:
    cluster, worker = world
    await expect_error(
        cluster.agent.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=worker.id, view=99)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="view",
    )
    await expect_error(
        cluster.agent.ListAgents(agent_service_pb2.ListAgentsRequest(project_id="demo", status=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="status",
    )


async def test_a_duration_with_mixed_signs_is_invalid_argument(world) -> None:
    cluster, _ = world
    thread = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo"))
    )
    for ttl in (
        duration_pb2.Duration(seconds=5, nanos=-1),
        duration_pb2.Duration(seconds=-5, nanos=1),
        duration_pb2.Duration(seconds=1, nanos=1_000_000_000),
    ):
        await expect_error(
            cluster.usage.ReserveBudget(
                U.ReserveBudgetRequest(reservation_id="r1", thread_id=thread.id, tokens=10, ttl=ttl)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="ttl",
        )
    budget = await cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id=thread.id))
    assert budget.reserved_tokens == 0


async def test_oversized_strings_are_400_naming_the_field_never_429(world) -> None:
    """A 20 KB value once came back as 429 RESOURCE_EXHAUSTED ("received metadata size
    exceeds hard limit"): the error echoed the whole value into trailers too small for it.
    Every field is bounded at the edge, and an error echoes a short prefix at most."""
    import httpx

    from tests.helpers import ADMIN_TOKEN
    from tests.helpers.servers import serve_gateway

    cluster, worker = world
    huge = "Z" * 20_000
    api = "/api/v1"
    async with (
        serve_gateway(cluster) as url,
        httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as http,
    ):
        cases = [
            ("post", "/projects/demo/budgets",
             {"scope": "project", "limit_tokens": 10, "period": "day", "time_zone": huge},
             "budget.time_zone"),
            ("post", f"/agents/{worker.id}/inbox:ack", {"ack_ids": [huge]}, "ack_ids[0]"),
            ("post", "/projects/demo/webhooks",
             {"url": "https://93.184.216.34/x", "event_types": [huge]}, "event_types[0]"),
            ("post", "/projects", {"id": "p2", "display_name": "x" * 100_000}, "display_name"),
        ]  # fmt: skip
        for verb, path, body, field in cases:
            answer = await http.request(verb, api + path, json=body)
            assert answer.status_code == 400, (path, answer.status_code, answer.text[:300])
            error = answer.json()["error"]
            assert error["status"] == "INVALID_ARGUMENT" and field in error["message"], error
            assert len(answer.content) < 4000, (path, len(answer.content))
    # Over gRPC the same: INVALID_ARGUMENT, the details short.
    caught = await expect_error(
        cluster.agent.UpdateAgent(agent_service_pb2.UpdateAgentRequest(
            agent_id=worker.id, agent=agent_pb2.Agent(current_task="t" * 70_000),
            update_mask={"paths": ["current_task"]})),
        grpc.StatusCode.INVALID_ARGUMENT, field="agent.current_task",
    )  # fmt: skip
    assert len(caught.details()) < 1000
    budgets = await cluster.usage.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
    assert not budgets.budgets  # nothing was written


async def test_client_chosen_ids_keep_to_a_url_safe_alphabet(world) -> None:
    """Ids a client chooses must be reachable over REST as they are: '/', '?', '#', spaces,
    '.' and '..' were accepted by CreateThread and then unreachable (404) by URL."""
    import httpx

    from tests.helpers import ADMIN_TOKEN
    from tests.helpers.servers import serve_gateway

    cluster, worker = world
    for bad in ("a/b", "q?x", "h#x", "..", ".", "sp ace", "per%2Fcent", "x" * 129, "ü"):
        await expect_error(
            cluster.thread.CreateThread(
                T.CreateThreadRequest(thread_id=bad, thread=thread_pb2.Thread(project_id="demo"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT, field="thread_id",
        )  # fmt: skip
    for call, field in (
        (cluster.usage.RecordUsage(U.RecordUsageRequest(
            usage_id="u/1", thread_id="t", agent_id=worker.id, project_id="demo", model="m")), "usage_id"),
        (cluster.usage.ReserveBudget(U.ReserveBudgetRequest(
            reservation_id="r?1", thread_id="t", tokens=1)), "reservation_id"),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field=field)
    inbox = cluster.thread.ReceiveMessages(
        T.ReceiveMessagesRequest(agent_id=worker.id, consumer="a b")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inbox.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    made = await cluster.thread.CreateThread(
        T.CreateThreadRequest(thread_id="Run-7.a_b", thread=thread_pb2.Thread(project_id="demo"))
    )
    assert made.id == "Run-7.a_b"
    async with (
        serve_gateway(cluster) as url,
        httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as http,
    ):
        got = await http.get("/api/v1/threads/Run-7.a_b")
        assert got.status_code == 200, got.text
