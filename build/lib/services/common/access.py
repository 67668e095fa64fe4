"""Visibility checks that only the agent service can answer, asked with the caller's token.

The thread and usage services never judge ownership themselves: they ask the agent
service (GetProject / GetAgent with the caller's own credentials, forwarded by the client
interceptor), so the callee judges the original caller. Answers are cached per replica
for AUTH_CACHE_SECONDS, keyed by principal and resource.
"""

from __future__ import annotations

import time

import grpc

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from services.common import errors
from services.common.auth import AGENT, Principal
from services.common.clients import PeerClients
from services.common.context import current_principal


class Visibility:
    def __init__(self, peers: PeerClients, cache_s: float) -> None:
        self._peers = peers
        self._cache_s = cache_s
        self._projects: dict[tuple[str, str], float] = {}

    async def project(self, project_id: str) -> bool:
        """Whether the caller may see `project_id`."""
        principal = current_principal()
        if principal.is_superuser:
            return True
        if principal.role == AGENT:
            return project_id == principal.project_id
        key = (principal.label, project_id)
        if self._projects.get(key, 0.0) > time.monotonic():
            return True
        try:
            await self._peers.agent.GetProject(
                agent_service_pb2.GetProjectRequest(project_id=project_id)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return False
            raise
        self._remember(self._projects, key, time.monotonic() + self._cache_s)
        return True

    async def agent(self, agent_id: str) -> agent_pb2.Agent | None:
        """The agent (BASIC view) if the caller may see it, else None. Never cached: callers
        act on its status, which must be current."""
        try:
            agent = await self._peers.agent.GetAgent(
                agent_service_pb2.GetAgentRequest(
                    agent_id=agent_id, view=agent_service_pb2.AGENT_VIEW_BASIC
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise
        return agent

    @staticmethod
    def _remember(cache: dict, key: tuple[str, str], value: object) -> None:  # type: ignore[type-arg]
        if len(cache) > 50_000:
            cache.clear()
        cache[key] = value


def require_manager(principal: Principal | None = None) -> Principal:
    principal = principal or current_principal()
    if principal.role == AGENT:
        raise errors.permission_denied("an agent token cannot do this", "AGENT_TOKEN")
    return principal


def require_superuser(what: str) -> Principal:
    principal = current_principal()
    if not principal.is_superuser:
        raise errors.permission_denied(f"{what} is for the superuser only", "SUPERUSER_ONLY")
    return principal


def require_self(agent_id: str, field: str) -> None:
    """An agent token acts only as its agent."""
    principal = current_principal()
    if principal.role == AGENT and agent_id != principal.subject:
        raise errors.permission_denied(
            f"an agent token acts only as its own agent, not as {field}={agent_id!r}", "NOT_SELF"
        )
