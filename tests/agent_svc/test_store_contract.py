"""The AgentStorage contract, against the Redis store itself (standalone and cluster):
records, indexes and pages, spawn and lifecycle outcomes, keys and status events."""

from __future__ import annotations

import pytest

from services.agent_svc.store import ALL, AgentChange, AgentStorage, AgentStore, Outcome
from services.common.pagination import parse_page
from tests.helpers.servers import store_clients


@pytest.fixture
async def store(redis_target):
    async with store_clients("agent_svc", redis_target) as (redis, streams):
        yield AgentStore(redis, request_ttl_s=600, streams=streams)


def page(size: int = 20, token: str = ""):
    return parse_page(size, token, 0, ("contract",))


def agent(agent_id: str, name: str, project: str = "p") -> dict[str, str]:
    return {"id": agent_id, "project_id": project, "name": name, "agent_type_id": "coder",
            "status": "IDLE", "create_ms": "1", "update_ms": "1", "tasks_completed": "0"}  # fmt: skip


async def test_projects_and_types_are_created_once_and_listed(store: AgentStorage) -> None:
    for project_id, owner in (("p", "team-a"), ("q", "team-b")):
        assert await store.create_project(
            {"id": project_id, "owner": owner, "display_name": project_id.upper()}
        )
    assert not await store.create_project({"id": "p", "owner": "x", "display_name": "again"})
    project = await store.get_project("p")
    assert project is not None and project.display_name == "P" and project.owner == "team-a"
    everything, _, total = await store.list_projects(page())
    assert [p.id for p in everything] == ["q", "p"] and total == 2  # newest first
    owned, _, total = await store.list_projects(page(), owner="team-a")
    assert [p.id for p in owned] == ["p"] and total == 1
    assert await store.create_type({"id": "coder", "display_name": "Coder", "is_active": "1"})
    assert await store.create_type({"id": "old", "display_name": "Old", "is_active": "0"})
    active, _, total = await store.list_types(page(), active_only=True)
    assert [t.id for t in active] == ["coder"] and total == 1
    await store.update_type("old", {"is_active": "1"})
    assert (await store.list_types(page(), active_only=True))[2] == 2
    types, projects = await store.display_names(["coder"], ["p"])
    assert types == {"coder": "Coder"} and projects == {"p": "P"}


async def test_spawn_and_lifecycle_outcomes(store: AgentStorage) -> None:
    await store.create_project({"id": "p", "owner": "o", "display_name": "P"})
    made = await store.spawn(agent("a1", "alpha"), "req-1")
    assert made.outcome == Outcome.OK and made.detail == "a1"
    again = await store.spawn(agent("a2", "alpha"), "req-1")
    assert again.outcome == Outcome.DUPLICATE and again.detail == "a1"
    taken = await store.spawn(agent("a3", "alpha"), "")
    assert taken.outcome == Outcome.NAME_TAKEN and taken.detail == "a1"
    assert (await store.spawn(agent("a4", "x", project="none"), "")).outcome == Outcome.NO_PROJECT
    await store.spawn(agent("a5", "beta"), "")

    work = AgentChange("a1", target_status="WORKING", allowed_from=("IDLE", "WAITING"))
    assert (await store.update(work, "p")).outcome == Outcome.OK
    refused = await store.update(
        AgentChange("a1", target_status="PAUSED", allowed_from=("IDLE",)), "p"
    )
    assert refused.outcome == Outcome.BAD_STATE and refused.detail == "WORKING"
    rename = AgentChange("a5", new_name="alpha")
    assert (await store.update(rename, "p")).outcome == Outcome.NAME_TAKEN
    assert (await store.update(AgentChange("none"), "p")).outcome == Outcome.NOT_FOUND
    agent_a1 = await store.get_agent("a1")
    assert agent_a1 is not None and agent_a1.status == "WORKING" and agent_a1.name == "alpha"
    working, _, total = await store.list_agents("p", "WORKING", page())
    assert [a.id for a in working] == ["a1"] and total == 1
    everyone, token, total = await store.list_agents(ALL, "", page(1))
    assert total == 2 and len(everyone) == 1 and token
    assert [a.id for a in await store.get_agents(["a5", "nope", "a1"])] == ["a5", "a1"]
    events = await store.read_events("p", "0-0", 100)
    assert events[-1].agent_id == "a1" and events[-1].previous_status == "IDLE"
    assert events[0].previous_status == ""  # a spawn
    assert await store.last_event_id("p") == events[-1].entry_id
    project = await store.get_project("p")
    assert project is not None and project.agents_total == 2
    assert project.agents_by_status["WORKING"] == 1 and project.agents_by_status["IDLE"] == 1


async def test_api_keys_are_listed_per_principal_and_revoked(store: AgentStorage) -> None:
    await store.create_key({"key_id": "k1", "role": "OWNER", "subject": "a"}, ["a"])
    await store.create_key({"key_id": "k2", "role": "OWNER", "subject": "b"}, ["b", "a"])
    mine, _, total = await store.list_keys(page(), visible_to="b")
    assert [k.key_id for k in mine] == ["k2"] and total == 1
    assert (await store.list_keys(page(), visible_to=None))[2] == 2
    await store.revoke_key("k1")
    key = await store.get_key("k1")
    assert key is not None and key.revoked and key.role == "OWNER"
    assert await store.get_key("none") is None
