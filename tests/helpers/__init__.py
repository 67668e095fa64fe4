"""Test helpers: build resources through the real API and check error statuses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from agentplane.agent.v1 import agent_pb2, agent_service_pb2, agent_type_pb2, project_pb2
from services.common.errors import details_of


async def expect_error(
    call: Awaitable[Any],
    code: grpc.StatusCode,
    *,
    reason: str | None = None,
    field: str | None = None,
) -> grpc.aio.AioRpcError:
    """Await `call`, require it to fail with `code` (and ErrorInfo reason / BadRequest field)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    details = details_of(error)
    if reason is not None:
        infos = [d for d in details if isinstance(d, error_details_pb2.ErrorInfo)]
        assert infos and infos[0].reason == reason, details
    if field is not None:
        fields = [
            v.field
            for d in details
            if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations
        ]
        assert field in fields, details
    return error


async def make_project(
    stub: Any, project_id: str = "demo", name: str = "Demo"
) -> project_pb2.Project:
    return await stub.CreateProject(
        agent_service_pb2.CreateProjectRequest(
            project=project_pb2.Project(display_name=name), project_id=project_id
        )
    )


async def make_type(
    stub: Any, type_id: str = "coder", active: bool = True
) -> agent_type_pb2.AgentType:
    return await stub.CreateAgentType(
        agent_service_pb2.CreateAgentTypeRequest(
            agent_type=agent_type_pb2.AgentType(
                id=type_id,
                display_name=type_id.title(),
                is_active=active,
                input_schema='{"type": "object"}',
            )
        )
    )


async def spawn(
    stub: Any, name: str, project_id: str = "demo", type_id: str = "coder", **fields: Any
) -> agent_pb2.Agent:
    request_id = fields.pop("request_id", "")
    return await stub.SpawnAgent(
        agent_service_pb2.SpawnAgentRequest(
            project_id=project_id,
            agent=agent_pb2.Agent(agent_type_id=type_id, name=name, **fields),
            request_id=request_id,
        )
    )


ADMIN_TOKEN = "test-admin-token-not-for-production"


class _BearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with(details, self.metadata), request)


class _BearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with(details, self.metadata), request)


def _with(details: grpc.aio.ClientCallDetails, item: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
    given = [m for m in (details.metadata or ()) if m[0] == "authorization"]
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, grpc.aio.Metadata(*metadata, *(given or [item])),
        details.credentials, details.wait_for_ready,
    )  # fmt: skip


def authed_channel(address: str, token: str | None = ADMIN_TOKEN) -> grpc.aio.Channel:
    """A plaintext channel whose calls carry `token` (the superuser's by default); a call's
    own `authorization` metadata wins. token=None: no credentials at all."""
    interceptors = [] if token is None else [_BearerUnary(token), _BearerStream(token)]
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


async def until(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Call `probe` until it answers something truthy, and return that answer."""
    async with asyncio.timeout(timeout):
        while True:
            answer = await probe()
            if answer:
                return answer
            await asyncio.sleep(0.05)


def sdk_env(cluster: Any, token: str) -> dict[str, str]:
    """The environment an SDK process (CLI, example agent) reads its cluster from."""
    return {
        "AGENTPLANE_AGENT_ADDR": cluster.address("agent"),
        "AGENTPLANE_THREAD_ADDR": cluster.address("thread"),
        "AGENTPLANE_USAGE_ADDR": cluster.address("usage"),
        "AGENTPLANE_TOKEN": token, "PATH": "/usr/bin:/bin",
    }  # fmt: skip
