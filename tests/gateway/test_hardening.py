"""REST answers that once misled clients: PATCH of multi-word fields, Retry-After where
retrying cannot help, SSE errors after a 200, the seed's flat usage shapes."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import API

pytestmark = pytest.mark.usefixtures("seeded")


async def _agent(http: httpx.AsyncClient, name: str) -> dict:
    listed = (await http.get(f"{API}/projects/demo/agents")).json()["data"]
    return next(a for a in listed if a["name"] == name)


async def test_patch_changes_multi_word_fields(http) -> None:
    alpha = await _agent(http, "alpha")
    patched = await http.patch(
        f"{API}/projects/demo/agents/{alpha['id']}",
        json={"current_task": "triage", "long_term_memory_ref": "s3://mem/alpha"},
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["current_task"] == "triage"
    assert patched.json()["long_term_memory_ref"] == "s3://mem/alpha"
    assert patched.json()["name"] == "alpha"  # untouched: only the fields sent change
    kind = await http.patch(f"{API}/capabilities/coder", json={"is_active": False})
    assert kind.status_code == 200, kind.text
    assert kind.json()["is_active"] is False
    again = await http.get(f"{API}/capabilities/coder")
    assert again.json()["is_active"] is False and again.json()["display_name"] == "Coder"
    # An explicit mask in either spelling works too.
    masked = await http.patch(
        f"{API}/capabilities/coder?update_mask=default_model,isActive",
        json={"default_model": "gpt-4o", "is_active": True},
    )
    assert masked.status_code == 200, masked.text
    assert masked.json()["default_model"] == "gpt-4o" and masked.json()["is_active"] is True


async def test_an_exhausted_budget_is_429_without_retry_after(http) -> None:
    thread = (
        await http.post(f"{API}/threads", json={"project_id": "demo", "max_tokens": 100})
    ).json()
    refused = await http.post(
        f"{API}/usage/threads/{thread['id']}:reserve",
        json={"reservation_id": "r1", "tokens": 500},
    )
    assert refused.status_code == 429, refused.text
    assert "retry-after" not in refused.headers
    assert any("QuotaFailure" in d["@type"] for d in refused.json()["error"]["details"])


async def test_sse_errors_known_before_the_first_event_are_http_statuses(http) -> None:
    async with http.stream("GET", f"{API}/threads/no-such-thread/events") as missing:
        assert missing.status_code == 404
        body = (await missing.aread()).decode()
        assert '"status":"NOT_FOUND"' in body and "event: error" not in body
    async with http.stream("GET", f"{API}/agents/no-such-agent/inbox") as inbox:
        assert inbox.status_code == 404
    async with http.stream("GET", f"{API}/projects/nope/agents:watch") as watch:
        assert watch.status_code == 404
    unauthenticated = await http.get(
        f"{API}/threads/x/events", headers={"authorization": "Bearer not-a-real-token"}
    )
    assert unauthenticated.status_code == 401
    # An open stream still answers 200 with events.
    alpha = await _agent(http, "alpha")
    async with http.stream("GET", f"{API}/agents/{alpha['id']}/inbox") as opened:
        assert opened.status_code == 200
        assert opened.headers["content-type"].startswith("text/event-stream")


async def test_usage_routes_keep_the_seed_flat_shapes(http) -> None:
    alpha = await _agent(http, "alpha")
    thread = (await http.post(f"{API}/threads", json={"project_id": "demo"})).json()
    recorded = await http.post(
        f"{API}/usage:record",
        json={
            "usage_id": "u-seed", "thread_id": thread["id"], "agent_id": alpha["id"],
            "project_id": "demo", "model": "gpt-4o", "prompt_tokens": 100,
            "completion_tokens": 50, "latency_ms": 10, "cost_usd": 0.25,
        },
    )  # fmt: skip
    assert recorded.status_code == 200, recorded.text
    keys = {"total_tokens", "prompt_tokens", "completion_tokens", "request_count", "total_cost"}
    agent = (await http.get(f"{API}/usage/agents/{alpha['id']}")).json()
    assert keys <= agent.keys() and agent["agent_id"] == alpha["id"], agent
    assert agent["total_tokens"] == 150 and agent["total_cost"] == pytest.approx(0.25)
    model = (await http.get(f"{API}/usage/models/gpt-4o")).json()
    assert keys <= model.keys() and model["model"] == "gpt-4o" and model["request_count"] == 1
    usage = (await http.get(f"{API}/usage")).json()["usage"]
    assert usage["totals"]["total_cost"] == pytest.approx(0.25)
    (by_agent,) = usage["by_agent"]
    assert keys <= by_agent.keys() and by_agent["agent_id"] == alpha["id"]
    (by_model,) = usage["by_model"]
    assert keys <= by_model.keys() and by_model["total_tokens"] == 150
    unknown = (await http.get(f"{API}/usage/models/unheard-of")).json()
    assert unknown["total_tokens"] == 0 and unknown["total_cost"] == 0


async def test_a_kills_reason_is_kept_and_shown(http) -> None:
    thread = (await http.post(f"{API}/threads", json={"project_id": "demo"})).json()
    killed = await http.post(f"{API}/threads/{thread['id']}/kill", json={"reason": "runaway loop"})
    assert killed.status_code == 200 and killed.json()["end_reason"] == "runaway loop"
    shown = (await http.get(f"{API}/threads/{thread['id']}")).json()
    assert shown["status"] == "killed" and shown["end_reason"] == "runaway loop"
    listed = (await http.get(f"{API}/threads", params={"status": "killed"})).json()
    assert [t["end_reason"] for t in listed["threads"]] == ["runaway loop"]
    done = (await http.post(f"{API}/threads", json={"project_id": "demo"})).json()
    completed = await http.post(f"{API}/threads/{done['id']}/complete", json={})
    assert completed.status_code == 200, completed.text
    assert completed.json()["end_reason"] == ""


async def test_a_window_refusal_is_429_with_retry_after(http) -> None:
    """A minute window made over REST refuses with 429 and says when to come back; the
    budget shows what the last minute used and what is in flight."""
    thread = (
        await http.post(f"{API}/threads", json={"project_id": "demo", "max_tokens": 10**6})
    ).json()
    made = await http.post(
        f"{API}/projects/demo/budgets",
        json={"scope": "PROJECT", "period": "MINUTE", "limit_tokens": 100, "limit_requests": 50,
              "max_in_flight": 8, "display_name": "tpm"},
    )  # fmt: skip
    assert made.status_code == 200, made.text
    budget = made.json()
    assert budget["period"] == "minute" and budget["max_in_flight"] == 8
    held = await http.post(
        f"{API}/usage/threads/{thread['id']}:reserve", json={"reservation_id": "a", "tokens": 80}
    )
    assert held.status_code == 200, held.text
    refused = await http.post(
        f"{API}/usage/threads/{thread['id']}:reserve", json={"reservation_id": "b", "tokens": 30}
    )
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    shown = (await http.get(f"{API}/projects/demo/budgets/{budget['budget_id']}")).json()
    assert shown["reserved_tokens"] == 80 and shown["in_flight"] == 1
    assert shown["used_requests"] == 1
