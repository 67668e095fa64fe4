"""Every status move of docs/api.md §2.1's table, allowed and refused, and the lifecycle RPCs."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from services.agent_svc.lifecycle import MOVES
from tests.helpers import expect_error, make_project, make_type, spawn

S = agent_pb2


def status(name: str) -> int:
    return S.AgentStatus.Value(f"AGENT_STATUS_{name}")


async def set_status(stub, agent_id: str, name: str) -> agent_pb2.Agent:
    return await stub.UpdateAgent(
        agent_service_pb2.UpdateAgentRequest(
            agent_id=agent_id,
            agent=agent_pb2.Agent(status=status(name)),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        )
    )


async def agent_in(stub, name: str, state: str) -> agent_pb2.Agent:
    """An agent brought to `state` by allowed moves only."""
    agent = await spawn(stub, name)
    route = {
        "IDLE": [],
        "WORKING": ["WORKING"],
        "WAITING": ["WORKING", "WAITING"],
        "PAUSED": ["PAUSED"],
        "TERMINATED": ["TERMINATED"],
    }[state]
    for step in route:
        agent = await set_status(stub, agent.id, step)
    assert agent.status == status(state)
    return agent


@pytest.fixture
async def stub(agent_stub):
    await make_project(agent_stub)
    await make_type(agent_stub)
    return agent_stub


PAIRS = [(a, b) for a in MOVES for b in MOVES]


@pytest.mark.parametrize(("current", "target"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
async def test_every_move_of_the_table(stub, current: str, target: str) -> None:
    agent = await agent_in(stub, f"a-{current}-{target}".lower(), current)
    if target in MOVES[current]:
        moved = await set_status(stub, agent.id, target)
        assert moved.status == status(target)
        again = await stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent.id))
        assert again.status == status(target)
    else:
        error = await expect_error(
            set_status(stub, agent.id, target),
            grpc.StatusCode.FAILED_PRECONDITION,
            reason="INVALID_STATUS_TRANSITION",
        )
        assert current in error.details() and target in error.details()
        unchanged = await stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent.id))
        assert unchanged.status == status(current)


async def test_task_cycle_counts_completed_tasks(stub) -> None:
    agent = await spawn(stub, "worker")
    started = await stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="t1"))
    assert started.status == status("WORKING") and started.current_task == "t1"
    done = await stub.CompleteTask(agent_service_pb2.CompleteTaskRequest(agent_id=agent.id))
    assert done.status == status("IDLE") and done.current_task == "" and done.tasks_completed == 1
    await set_status(stub, agent.id, "WORKING")
    await set_status(stub, agent.id, "WAITING")
    resumed = await stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="t2"))
    assert resumed.status == status("WORKING") and resumed.current_task == "t2"
    await stub.CompleteTask(agent_service_pb2.CompleteTaskRequest(agent_id=agent.id))
    metrics = await stub.GetAgentMetrics(
        agent_service_pb2.GetAgentMetricsRequest(agent_id=agent.id)
    )
    assert metrics.tasks_completed == 2


async def test_task_rpcs_refuse_wrong_states(stub) -> None:
    agent = await spawn(stub, "w")
    await expect_error(
        stub.CompleteTask(agent_service_pb2.CompleteTaskRequest(agent_id=agent.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await expect_error(
        stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="task",
    )
    await stub.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=agent.id))
    await expect_error(
        stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="x")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_pause_resume_terminate(stub) -> None:
    agent = await spawn(stub, "p", session_id="sess-1")
    await stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="job"))
    paused = await stub.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=agent.id))
    assert paused.status == status("PAUSED")
    await expect_error(
        stub.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=agent.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    resumed = await stub.ResumeAgent(agent_service_pb2.ResumeAgentRequest(agent_id=agent.id))
    assert resumed.status == status("IDLE")
    await expect_error(
        stub.ResumeAgent(agent_service_pb2.ResumeAgentRequest(agent_id=agent.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        reason="INVALID_STATUS_TRANSITION",
    )
    await stub.StartTask(agent_service_pb2.StartTaskRequest(agent_id=agent.id, task="job2"))
    gone = await stub.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=agent.id))
    assert gone.status == status("TERMINATED")
    assert gone.current_task == "" and gone.session_id == ""
    assert gone.HasField("terminate_time")
    error = await expect_error(
        stub.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=agent.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "TERMINATED" in error.details()
    # A terminated agent changes no more, not even its description.
    await expect_error(
        stub.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(
                agent_id=agent.id,
                agent=agent_pb2.Agent(description="late"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_terminated_agent_frees_its_name(stub) -> None:
    first = await spawn(stub, "reused")
    await expect_error(spawn(stub, "reused"), grpc.StatusCode.ALREADY_EXISTS)
    await stub.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=first.id))
    second = await spawn(stub, "reused")
    assert second.id != first.id


async def test_lifecycle_rpcs_check_the_project(stub) -> None:
    await make_project(stub, "other", "Other")
    agent = await spawn(stub, "x")
    await expect_error(
        stub.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=agent.id, project_id="other")),
        grpc.StatusCode.NOT_FOUND,
        reason="AGENT_NOT_FOUND",
    )
    still = await stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent.id))
    assert still.status == status("IDLE")
