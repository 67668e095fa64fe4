"""The model gateway under test: the real app and HTTP server in front of the real
services, forwarding to the fake provider (a real HTTP server on loopback)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import api_key_pb2
from agentplane.usage.v1 import usage_service_pb2 as U
from gateway.models.providers import load
from tests.helpers import make_project, make_type, spawn
from tests.helpers.fake_provider import PROVIDER_KEY, FakeProvider, fake_provider, providers_yaml
from tests.helpers.servers import Cluster, serve_models, start_cluster, stop_cluster


@dataclasses.dataclass
class Stack:
    cluster: Cluster
    fake: FakeProvider
    url: str  # the model gateway's root
    agent_id: str
    token: str  # the agent's key
    clients: list = dataclasses.field(default_factory=list)  # type: ignore[type-arg]

    def keep(self, client):  # type: ignore[no-untyped-def]
        """A client closed when the test ends."""
        self.clients.append(client)
        return client

    async def calls(self, **filters: object) -> list:  # type: ignore[type-arg]
        reply = await self.cluster.usage.ListModelCalls(
            U.ListModelCallsRequest(project_id="demo", **filters)  # type: ignore[arg-type]
        )
        return list(reply.calls)

    async def totals(self) -> object:
        reply = await self.cluster.usage.GetAgentUsage(
            U.GetAgentUsageRequest(agent_id=self.agent_id)
        )
        return reply.totals


async def agent_key(cluster: Cluster, name: str, project: str = "demo") -> tuple[str, str]:
    agent = await spawn(cluster.agent, name, project_id=project)
    key = await cluster.agent.CreateApiKey(
        A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id)
    )
    return agent.id, key.token


def catalog_for(fake: FakeProvider, tmp_path: Path, **kw: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "providers.yaml"
    path.write_text(providers_yaml(fake.url, **kw))
    return load(str(path), {"FAKE_PROVIDER_KEY": PROVIDER_KEY})


@pytest.fixture
async def stack(redis_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    cluster = await start_cluster(redis_url)
    try:
        await make_project(cluster.agent)
        await make_type(cluster.agent)
        agent_id, token = await agent_key(cluster, "caller")
        async with (
            fake_provider() as fake,
            serve_models(cluster, catalog_for(fake, tmp_path)) as url,
        ):
            stack = Stack(cluster, fake, url, agent_id, token)
            try:
                yield stack
            finally:
                for client in stack.clients:
                    await client.close()
    finally:
        await stop_cluster(cluster)
