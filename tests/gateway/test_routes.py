"""Every operators' route of docs/api.md §3 end to end: gateway → real services → real Redis."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from tests.gateway.conftest import ADMIN_HEADERS, API
from tests.helpers.servers import serve_gateway


async def test_organism_and_capabilities(http, seeded) -> None:
    organism = (await http.get(f"{API}/organism")).json()
    assert organism["project_count"] == 1 and organism["agents"]["idle"] == 2
    assert organism["threads"]["active"] == 1 and organism["unavailable_sources"] == []
    caps = (await http.get(f"{API}/capabilities")).json()
    assert caps["count"] == 1 and caps["capabilities"][0]["id"] == "coder"
    one = (await http.get(f"{API}/capabilities/coder")).json()
    assert one["display_name"] == "Coder" and one["is_active"] is True


async def test_agents_routes(http, seeded) -> None:
    alpha, beta, _ = seeded
    listed = await http.get(f"{API}/agents", params={"status": "idle", "limit": 1, "offset": 1})
    body = listed.json()
    assert (
        listed.status_code == 200
        and body["total_size"] == 2
        and [a["id"] for a in body["agents"]] == [alpha["id"]]
    )
    assert (await http.get(f"{API}/agents", params={"limit": 0})).status_code == 400
    agent = (await http.get(f"{API}/agents/{alpha['id']}")).json()
    assert (
        agent["status"] == "idle" and agent["tokens_used"] == 0 and agent["terminate_time"] is None
    )
    assert agent["project_name"] == "Demo" and isinstance(agent["tasks_completed"], int)
    schema = (await http.get(f"{API}/agents/{alpha['id']}/schema")).json()
    assert schema == {"schema": '{"type": "object"}', "content_type": "application/schema+json"}
    config = (await http.get(f"{API}/agents/{alpha['id']}/config")).json()
    assert config == {
        "name": "alpha",
        "description": "",
        "agent_type_id": "coder",
        "peers": [beta["id"]],
    }
    paused = await http.post(f"{API}/agents/{alpha['id']}/pause")
    assert paused.json()["status"] == "paused"
    resumed = await http.post(f"{API}/agents/{alpha['id']}/resume")
    assert resumed.json()["status"] == "idle"


async def test_project_agent_routes(http, seeded) -> None:
    alpha, beta, _ = seeded
    made = await http.post(
        f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "name": "gamma"}
    )
    assert made.status_code == 201 and made.json()["name"] == "gamma"
    page = (await http.get(f"{API}/projects/demo/agents", params={"page": 2, "limit": 2})).json()
    assert page["pagination"] == {
        "total": 3,
        "page": 2,
        "page_size": 2,
        "total_pages": 2,
        "has_next": False,
        "has_prev": True,
    }
    assert [a["name"] for a in page["data"]] == ["alpha"]
    metrics = (await http.get(f"{API}/projects/demo/agents/metrics")).json()
    assert metrics["total_instances"] == 3 and metrics["idle_instances"] == 3
    got = (await http.get(f"{API}/projects/demo/agents/{beta['id']}")).json()
    assert got["id"] == beta["id"]
    patched = await http.patch(
        f"{API}/projects/demo/agents/{beta['id']}", json={"status": "paused"}
    )
    # A PATCH changes exactly the fields in its body: the status, not the (empty) peers.
    assert patched.json()["status"] == "paused" and patched.json()["peers"] == []
    assert patched.json()["name"] == "beta"
    resumed = await http.post(f"{API}/projects/demo/agents/{beta['id']}/resume")
    assert resumed.json()["status"] == "idle"
    paused = await http.post(f"{API}/projects/demo/agents/{beta['id']}/pause")
    assert paused.json()["status"] == "paused"
    agent_metrics = (await http.get(f"{API}/projects/demo/agents/{beta['id']}/metrics")).json()
    assert agent_metrics["status"] == "paused"
    deleted = await http.delete(f"{API}/projects/demo/agents/{beta['id']}")
    assert deleted.json() == {"success": True, "message": f"agent {beta['id']} terminated"}
    # An agent of another project answers 404, exactly like one that does not exist.
    await http.post(
        f"{API}/projects", params={"project_id": "other"}, json={"display_name": "Other"}
    )
    elsewhere = await http.get(f"{API}/projects/other/agents/{alpha['id']}")
    missing = await http.get(f"{API}/projects/other/agents/01ZZZZZZZZZZZZZZZZZZZZZZZZ")
    assert elsewhere.status_code == missing.status_code == 404
    assert elsewhere.json()["error"]["status"] == "NOT_FOUND"


async def test_thread_and_message_routes(http, seeded) -> None:
    alpha, beta, thread = seeded
    threads = (
        await http.get(
            f"{API}/threads", params={"status": "active", "agent": beta["id"], "limit": 5}
        )
    ).json()
    assert (
        threads["count"] == 1
        and threads["total"] == 1
        and threads["offset"] == 0
        and threads["limit"] == 5
    )
    one = (await http.get(f"{API}/threads/{thread['id']}")).json()
    # The seed's ThreadInfo: the thread's fields at the top level, its messages beside them.
    assert one["id"] == thread["id"] and one["status"] == "active" and "thread" not in one
    assert one["message_count"] == 1 and set(one["participants"]) == {alpha["id"], beta["id"]}
    assert one["messages"][0]["payload"] == {"text": "hello"}
    messages = (await http.get(f"{API}/threads/{thread['id']}/messages")).json()
    assert messages["total_size"] == 1 and messages["messages"][0]["from_agent"] == alpha["id"]
    across = (await http.get(f"{API}/messages", params={"agent": beta["id"]})).json()
    assert across["count"] == 1 and across["messages"][0]["to_agent"] == beta["id"]
    injected = await http.post(f"{API}/inject", json={"to": beta["id"], "payload": {"cmd": "stop"}})
    assert injected.status_code == 200 and set(injected.json()) == {"thread_id", "message_id"}
    unknown = await http.post(f"{API}/inject", json={"to": "ghost", "payload": {}})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["details"][-1]["field_violations"][0]["field"] == "to"
    killed = await http.post(f"{API}/threads/{thread['id']}/kill")
    assert killed.json()["status"] == "killed"


async def test_usage_routes(http, seeded) -> None:
    alpha, _, thread = seeded
    call = {"usage_id": "u1", "thread_id": thread["id"], "agent_id": alpha["id"]}
    call |= {"project_id": "demo", "model": "gpt-4o", "prompt_tokens": 1000}
    call |= {"completion_tokens": 100, "latency_ms": 300}
    recorded = await http.post(f"{API}/usage:record", json=call)
    assert recorded.status_code == 200, recorded.text
    usage = (await http.get(f"{API}/usage")).json()["usage"]
    assert set(usage) == {"totals", "by_agent", "by_model", "active_threads"}
    assert usage["totals"]["total_tokens"] == 1100 and isinstance(
        usage["totals"]["total_tokens"], int
    )
    budgets = (await http.get(f"{API}/usage/threads")).json()
    assert budgets["count"] == 1 and budgets["default_max_tokens"] == 100_000
    budget = (await http.get(f"{API}/usage/threads/{thread['id']}")).json()
    assert budget["total_tokens"] == 1100 and budget["percent_used"] == 1.1
    assert (await http.get(f"{API}/usage/threads/none")).status_code == 404
    assert (await http.get(f"{API}/usage/agents/{alpha['id']}")).json()["request_count"] == 1
    assert (await http.get(f"{API}/usage/models/gpt-4o")).json()["prompt_tokens"] == 1000
    held = await http.post(
        f"{API}/usage/threads/{thread['id']}:reserve", json={"reservation_id": "r", "tokens": 10**6}
    )
    assert held.status_code == 429 and "retry-after" not in held.headers
    assert held.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    reset = await http.post(f"{API}/usage/reset")
    assert reset.status_code == 200 and reset.json()["deleted_keys"] > 0


async def test_errors_are_enveloped(http, seeded) -> None:
    alpha, _, _ = seeded
    nowhere = await http.get(f"{API}/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == 404
    wrong_verb = await http.put(f"{API}/organism")
    assert wrong_verb.status_code == 405
    malformed = await http.post(f"{API}/projects/demo/agents", content=b"{not json")
    assert malformed.status_code == 400 and "body" in malformed.text
    bad_enum = await http.get(f"{API}/agents", params={"status": "sleepy"})
    assert bad_enum.status_code == 400 and "status" in bad_enum.json()["error"]["message"]
    bad_type = await http.post(
        f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "name": 5}
    )
    assert bad_type.status_code == 400
    bad_field = await http.post(
        f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "nope": 1}
    )
    assert bad_field.status_code == 400 and "nope" in bad_field.text
    conflict = await http.post(
        f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "name": "alpha"}
    )
    assert conflict.status_code == 409
    full_enum = await http.patch(
        f"{API}/projects/demo/agents/{alpha['id']}", json={"status": "AGENT_STATUS_PAUSED"}
    )
    assert full_enum.status_code == 200 and full_enum.json()["status"] == "paused"
    refused = await http.patch(
        f"{API}/projects/demo/agents/{alpha['id']}", json={"status": "working"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert refused.json()["error"]["details"][0]["reason"] == "INVALID_STATUS_TRANSITION"
    bad_page = await http.get(f"{API}/projects", params={"page_size": "many"})
    assert bad_page.status_code == 400


async def test_server_sent_events_deliver_a_posted_message(http, seeded) -> None:
    alpha, beta, thread = seeded

    async def first_event() -> dict:
        async with http.stream("GET", f"{API}/threads/{thread['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return orjson.loads(line[6:])
        raise AssertionError("stream ended")

    waiting = asyncio.create_task(first_event())
    await asyncio.sleep(0.5)
    await http.post(
        f"{API}/threads/{thread['id']}/messages",
        json={"from_agent": alpha["id"], "to_agent": beta["id"], "payload": {"text": "live"}},
    )
    event = await asyncio.wait_for(waiting, 10)
    assert event["message"]["payload"] == {"text": "live"} and event["thread"] is None


async def test_health_readiness_and_openapi(http) -> None:
    from openapi_spec_validator import validate

    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    spec = (await http.get("/openapi.json")).json()
    validate(spec)
    assert "/api/v1/projects/{project_id}/agents/{agent_id}" in spec["paths"]
    agent = spec["components"]["schemas"]["agentplane.agent.v1.Agent"]
    assert agent["properties"]["name"]["description"].startswith("Name, unique")
    # Required and read-only, from the protos' field_behavior annotations.
    assert agent["required"] == ["agent_type_id", "name"]
    assert agent["properties"]["create_time"]["readOnly"] is True
    assert "readOnly" not in agent["properties"]["name"]
    budget = spec["components"]["schemas"]["agentplane.usage.v1.Budget"]
    assert set(budget["required"]) == {"scope", "period"}
    assert budget["properties"]["used_tokens"]["readOnly"] is True
    series = spec["paths"]["/api/v1/projects/{project_id}/usage:timeSeries"]["get"]
    given = {p["name"]: p.get("required", False) for p in series["parameters"]}
    assert given["granularity"] is True and given["agent_id"] is False
    assert (await http.get("/docs")).status_code == 200


async def test_backend_down_is_503_and_slow_is_504(cluster) -> None:
    async with (
        serve_gateway(cluster, peer_timeout_s=0.001) as url,
        httpx.AsyncClient(base_url=url, headers=ADMIN_HEADERS) as client,
    ):
        slow = await client.get(f"{API}/organism")
        assert slow.status_code == 504 and slow.json()["error"]["status"] == "DEADLINE_EXCEEDED"
    await cluster.apps["usage"].stop(grace=0)
    async with (
        serve_gateway(cluster) as url,
        httpx.AsyncClient(base_url=url, headers=ADMIN_HEADERS) as client,
    ):
        down = await client.get(f"{API}/usage")
        assert down.status_code == 503
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["backends"]["usage"] != "SERVING"
