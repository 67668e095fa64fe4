"""Projects, agent types, spawning, listing, updates, metrics, overview and watching."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2, agent_type_pb2, project_pb2
from tests.helpers import expect_error, make_project, make_type, spawn

M = agent_service_pb2


@pytest.fixture
async def stub(agent_stub):
    await make_project(agent_stub)
    await make_type(agent_stub)
    return agent_stub


async def test_projects_create_get_list(agent_stub) -> None:
    made = await make_project(agent_stub, "alpha", "Alpha")
    assert made.id == "alpha" and made.display_name == "Alpha" and made.HasField("create_time")
    assert (await agent_stub.GetProject(M.GetProjectRequest(project_id="alpha"))) == made
    server_made = await agent_stub.CreateProject(
        M.CreateProjectRequest(project=project_pb2.Project(display_name="No id"))
    )
    assert len(server_made.id) == 26
    await expect_error(make_project(agent_stub, "alpha"), grpc.StatusCode.ALREADY_EXISTS)
    await expect_error(
        agent_stub.GetProject(M.GetProjectRequest(project_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        reason="PROJECT_NOT_FOUND",
    )
    await expect_error(
        agent_stub.CreateProject(M.CreateProjectRequest(project=project_pb2.Project())),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="project.display_name",
    )
    await expect_error(
        make_project(agent_stub, "Bad Id!"), grpc.StatusCode.INVALID_ARGUMENT, field="project_id"
    )
    listed = await agent_stub.ListProjects(M.ListProjectsRequest())
    assert [p.id for p in listed.projects] == [server_made.id, "alpha"]  # newest first
    assert listed.total_size == 2 and listed.next_page_token == ""


async def test_agent_types(agent_stub) -> None:
    made = await make_type(agent_stub, "coder")
    assert made.is_active and made.input_schema == '{"type": "object"}'
    await make_type(agent_stub, "asleep", active=False)
    await expect_error(make_type(agent_stub, "coder"), grpc.StatusCode.ALREADY_EXISTS)
    await expect_error(
        agent_stub.CreateAgentType(
            M.CreateAgentTypeRequest(
                agent_type=agent_type_pb2.AgentType(id="x", display_name="X", input_schema="{nope")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent_type.input_schema",
    )
    listed = await agent_stub.ListAgentTypes(M.ListAgentTypesRequest())
    assert [t.id for t in listed.agent_types] == ["asleep", "coder"] and listed.total_size == 2
    active = await agent_stub.ListAgentTypes(M.ListAgentTypesRequest(active_only=True))
    assert [t.id for t in active.agent_types] == ["coder"] and active.total_size == 1
    updated = await agent_stub.UpdateAgentType(
        M.UpdateAgentTypeRequest(
            agent_type_id="coder",
            agent_type=agent_type_pb2.AgentType(description="writes code", is_active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["description", "is_active"]),
        )
    )
    assert updated.description == "writes code" and not updated.is_active
    assert updated.display_name == "Coder"  # not in the mask: untouched
    now_active = await agent_stub.ListAgentTypes(M.ListAgentTypesRequest(active_only=True))
    assert now_active.total_size == 0 and not now_active.agent_types
    await expect_error(
        agent_stub.UpdateAgentType(
            M.UpdateAgentTypeRequest(
                agent_type_id="coder", update_mask=field_mask_pb2.FieldMask(paths=["id"])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="update_mask",
    )
    await expect_error(
        agent_stub.UpdateAgentType(
            M.UpdateAgentTypeRequest(
                agent_type_id="ghost",
                agent_type=agent_type_pb2.AgentType(description="d"),
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        reason="AGENT_TYPE_NOT_FOUND",
    )


async def test_spawn_checks_type_project_and_name(stub) -> None:
    await make_type(stub, "asleep", active=False)
    await expect_error(
        spawn(stub, "a", type_id="asleep"),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="AGENT_TYPE_INACTIVE",
    )
    await expect_error(spawn(stub, "a", type_id="ghost"), grpc.StatusCode.NOT_FOUND)
    await expect_error(
        spawn(stub, "a", project_id="ghost"), grpc.StatusCode.NOT_FOUND, reason="PROJECT_NOT_FOUND"
    )
    await expect_error(spawn(stub, ""), grpc.StatusCode.INVALID_ARGUMENT, field="agent.name")
    await expect_error(
        spawn(stub, "a", peers=[""]), grpc.StatusCode.INVALID_ARGUMENT, field="agent.peers"
    )
    huge = struct_pb2.Struct()
    huge.update({"blob": "x" * 70_000})
    await expect_error(
        spawn(stub, "a", short_term_memory=huge),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent.short_term_memory",
    )
    # Nothing was written by any refused spawn.
    listed = await stub.ListAgents(M.ListAgentsRequest(project_id="-"))
    assert listed.total_size == 0
    memory = struct_pb2.Struct()
    memory.update({"goal": "ship", "step": 3})
    agent = await spawn(
        stub, "a", description="first", peers=["p1", "p2"], short_term_memory=memory
    )
    assert agent.status == agent_pb2.AGENT_STATUS_IDLE
    assert agent.agent_type_name == "Coder" and agent.project_name == "Demo"
    assert list(agent.peers) == ["p1", "p2"] and agent.short_term_memory == memory
    await expect_error(spawn(stub, "a"), grpc.StatusCode.ALREADY_EXISTS)


async def test_spawn_with_request_id_is_idempotent(stub) -> None:
    results = await asyncio.gather(*(spawn(stub, "same", request_id="req-1") for _ in range(8)))
    assert len({a.id for a in results}) == 1
    again = await spawn(stub, "same", request_id="req-1")
    assert again.id == results[0].id
    listed = await stub.ListAgents(M.ListAgentsRequest(project_id="demo"))
    assert listed.total_size == 1


async def test_pagination_has_no_duplicates_or_gaps(stub) -> None:
    made = [await spawn(stub, f"agent-{i:02d}") for i in range(25)]
    seen: list[str] = []
    token, pages = "", 0
    while pages == 0 or token:
        page = await stub.ListAgents(
            M.ListAgentsRequest(project_id="demo", page_size=7, page_token=token)
        )
        assert page.total_size == (25 if pages == 0 else 26)
        assert len(page.agents) == min(7, 25 - len(seen))
        seen += [a.id for a in page.agents]
        token, pages = page.next_page_token, pages + 1
        if pages == 1:
            # An agent spawned between pages sorts before the cursor: no duplicate, no gap.
            await spawn(stub, "late-comer")
    assert pages == 4
    assert seen == [a.id for a in reversed(made)]
    assert len(seen) == len(set(seen))


async def test_page_size_rules_and_bad_tokens(stub) -> None:
    for i in range(3):
        await spawn(stub, f"n{i}")
    await expect_error(
        stub.ListAgents(M.ListAgentsRequest(project_id="demo", page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_size",
    )
    await expect_error(
        stub.ListAgents(M.ListAgentsRequest(project_id="demo", page_token="garbage!!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_token",
    )
    page = await stub.ListAgents(M.ListAgentsRequest(project_id="demo", page_size=1))
    # A token is bound to its query: replaying it with another filter is refused.
    await expect_error(
        stub.ListAgents(
            M.ListAgentsRequest(
                project_id="demo",
                status=agent_pb2.AGENT_STATUS_IDLE,
                page_token=page.next_page_token,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="page_token",
    )
    clamped = await stub.ListAgents(M.ListAgentsRequest(project_id="demo", page_size=10_000))
    assert len(clamped.agents) == 3 and clamped.next_page_token == ""
    skipped = await stub.ListAgents(M.ListAgentsRequest(project_id="demo", skip=2))
    assert [a.name for a in skipped.agents] == ["n0"]


async def test_filters_by_project_and_status(stub) -> None:
    await make_project(stub, "other", "Other")
    a = await spawn(stub, "a")
    b = await spawn(stub, "b")
    c = await spawn(stub, "c", project_id="other")
    await stub.PauseAgent(M.PauseAgentRequest(agent_id=b.id))
    paused = await stub.ListAgents(
        M.ListAgentsRequest(project_id="-", status=agent_pb2.AGENT_STATUS_PAUSED)
    )
    assert [x.id for x in paused.agents] == [b.id] and paused.total_size == 1
    idle_all = await stub.ListAgents(
        M.ListAgentsRequest(project_id="-", status=agent_pb2.AGENT_STATUS_IDLE)
    )
    assert [x.id for x in idle_all.agents] == [c.id, a.id]
    other = await stub.ListAgents(M.ListAgentsRequest(project_id="other"))
    assert [x.id for x in other.agents] == [c.id]
    await expect_error(
        stub.ListAgents(M.ListAgentsRequest(project_id="ghost")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        stub.ListAgents(M.ListAgentsRequest(project_id="demo", status=99)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="status",
    )


async def test_get_checks_the_project(stub) -> None:
    await make_project(stub, "other", "Other")
    agent = await spawn(stub, "a")
    assert (
        await stub.GetAgent(M.GetAgentRequest(agent_id=agent.id, project_id="demo"))
    ).id == agent.id
    await expect_error(
        stub.GetAgent(M.GetAgentRequest(agent_id=agent.id, project_id="other")),
        grpc.StatusCode.NOT_FOUND,
        reason="AGENT_NOT_FOUND",
    )
    await expect_error(
        stub.GetAgent(M.GetAgentRequest(agent_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="agent_id",
    )


async def test_update_agent_changes_only_masked_fields(stub) -> None:
    agent = await spawn(stub, "a", description="old", session_id="s1")
    memory = struct_pb2.Struct()
    memory.update({"k": "v"})
    updated = await stub.UpdateAgent(
        M.UpdateAgentRequest(
            agent_id=agent.id,
            project_id="demo",
            agent=agent_pb2.Agent(
                name="renamed",
                description="new",
                session_id="ignored",
                short_term_memory=memory,
                peers=["x"],
            ),
            update_mask=field_mask_pb2.FieldMask(
                paths=["name", "description", "short_term_memory", "peers"]
            ),
        )
    )
    assert updated.name == "renamed" and updated.description == "new"
    assert updated.session_id == "s1" and updated.short_term_memory == memory
    assert list(updated.peers) == ["x"]
    await spawn(stub, "a")  # the old name is free again
    await expect_error(
        stub.UpdateAgent(
            M.UpdateAgentRequest(
                agent_id=agent.id,
                agent=agent_pb2.Agent(name="a"),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await expect_error(
        stub.UpdateAgent(M.UpdateAgentRequest(agent_id=agent.id, agent=agent_pb2.Agent())),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="update_mask",
    )
    await expect_error(
        stub.UpdateAgent(
            M.UpdateAgentRequest(
                agent_id=agent.id,
                update_mask=field_mask_pb2.FieldMask(paths=["tokens_used"]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="update_mask",
    )


async def test_schema_metrics_and_overview(stub) -> None:
    a = await spawn(stub, "a")
    b = await spawn(stub, "b")
    await spawn(stub, "c")
    await stub.StartTask(M.StartTaskRequest(agent_id=a.id, task="t"))
    await stub.CompleteTask(M.CompleteTaskRequest(agent_id=a.id))
    await stub.StartTask(M.StartTaskRequest(agent_id=a.id, task="t2"))
    await stub.TerminateAgent(M.TerminateAgentRequest(agent_id=b.id))
    schema = await stub.GetAgentSchema(M.GetAgentSchemaRequest(agent_id=a.id))
    assert (
        schema.schema == '{"type": "object"}' and schema.content_type == "application/schema+json"
    )
    project = await stub.GetProjectAgentMetrics(M.GetProjectAgentMetricsRequest(project_id="demo"))
    assert (project.total_instances, project.active_instances, project.idle_instances) == (3, 1, 1)
    assert project.terminated_instances == 1 and project.total_tasks_completed == 1
    assert project.total_tokens_used == 0  # the usage service is down: zeros, not an error
    overview = await stub.GetOverview(M.GetOverviewRequest())
    assert overview.project_count == 1 and overview.agent_type_count == 1
    assert (overview.agents.total, overview.agents.working, overview.agents.terminated) == (3, 1, 1)
    assert set(overview.unavailable_sources) == {"thread", "usage"}
    metrics = await stub.GetAgentMetrics(M.GetAgentMetricsRequest(agent_id=a.id, project_id="demo"))
    assert metrics.status == agent_pb2.AGENT_STATUS_WORKING and metrics.tasks_completed == 1


async def test_watch_agents_streams_status_changes(stub) -> None:
    await make_project(stub, "other", "Other")
    stream = stub.WatchAgents(M.WatchAgentsRequest(project_id="demo"))
    everything = stub.WatchAgents(M.WatchAgentsRequest(project_id="-"))
    await asyncio.sleep(0.2)  # let both streams subscribe
    agent = await spawn(stub, "w")
    await spawn(stub, "elsewhere", project_id="other")
    await stub.PauseAgent(M.PauseAgentRequest(agent_id=agent.id))
    first = await asyncio.wait_for(stream.read(), 5)
    second = await asyncio.wait_for(stream.read(), 5)
    assert (
        first.agent.id == agent.id and first.previous_status == agent_pb2.AGENT_STATUS_UNSPECIFIED
    )
    assert second.previous_status == agent_pb2.AGENT_STATUS_IDLE
    assert second.agent.status == agent_pb2.AGENT_STATUS_PAUSED
    names = [(await asyncio.wait_for(everything.read(), 5)).agent.name for _ in range(3)]
    assert names == ["w", "elsewhere", "w"]
    stream.cancel()
    everything.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WatchAgents(M.WatchAgentsRequest(project_id="ghost")).read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
