"""The gateway under test: the real app and HTTP server in front of real services."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import ADMIN_TOKEN
from tests.helpers.servers import serve_gateway

API = "/api/v1"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def http(cluster):
    async with (
        serve_gateway(cluster) as url,
        httpx.AsyncClient(base_url=url, timeout=10, headers=ADMIN_HEADERS) as client,
    ):
        yield client


@pytest.fixture
async def seeded(http):
    """A project, a type, two peered agents, a thread with a message."""
    made = await http.post(f"{API}/projects", json={"display_name": "Demo", "id": "demo"})
    assert made.status_code == 200, made.text
    kind = await http.post(
        f"{API}/capabilities",
        json={
            "id": "coder",
            "display_name": "Coder",
            "is_active": True,
            "input_schema": '{"type": "object"}',
        },
    )
    assert kind.status_code == 200, kind.text
    alpha = (
        await http.post(
            f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "name": "alpha"}
        )
    ).json()
    beta = (
        await http.post(
            f"{API}/projects/demo/agents", json={"agent_type_id": "coder", "name": "beta"}
        )
    ).json()
    patched = await http.patch(
        f"{API}/projects/demo/agents/{alpha['id']}", json={"peers": [beta["id"]]}
    )
    assert patched.status_code == 200 and patched.json()["peers"] == [beta["id"]]
    thread = (
        await http.post(f"{API}/threads", json={"project_id": "demo", "title": "work"})
    ).json()
    posted = await http.post(
        f"{API}/threads/{thread['id']}/messages",
        json={"from_agent": alpha["id"], "to_agent": beta["id"], "payload": {"text": "hello"}},
    )
    assert posted.status_code == 200, posted.text
    return alpha, beta, thread
