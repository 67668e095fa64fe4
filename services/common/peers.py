"""The chassis's typed peer client of the agent service: what the other processes ask it,
in one place.

The thread and usage services and the gateway never read the agent service's keys: they
ask it, with the caller's own credentials (forwarded by the chassis' client interceptor),
so it judges the original caller. Who a token is (`principal`, the authenticator's key
lookup), whether the caller may see a project (cached per principal and project for
AUTH_CACHE_SECONDS), and an agent as the caller may see it.
"""

from __future__ import annotations

import time

import grpc

from agentplane.agent.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc, api_key_pb2
from services.common import enums, errors, tuning
from services.common.auth import AGENT, Principal
from services.common.context import current_principal

UNSEEN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


class AgentClient:
    def __init__(self, channel: grpc.aio.Channel, cache_s: float) -> None:
        self._stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self._cache_s = cache_s
        self._projects: dict[tuple[str, str, str], float] = {}
        self._agent_projects: dict[tuple[str, str, str], tuple[float, str]] = {}

    async def principal(self, _key_id: str, token: str) -> Principal | None:
        """Who `token` is (None: unknown or revoked) — an Authenticator's key lookup."""
        try:
            reply = await self._stub.WhoAmI(
                agent_service_pb2.WhoAmIRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=tuning.WHOAMI_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            raise errors.unavailable(
                "cannot authenticate: the agent service is unreachable"
            ) from exc
        role = enums.short_name(api_key_pb2.ApiKeyRole, reply.role)
        return Principal(
            role, reply.subject, reply.project_id, reply.key_id, reply.agent_terminated
        )

    async def can_see_project(self, project_id: str) -> bool:
        """Whether the current caller may see `project_id`."""
        principal = current_principal()
        if principal.is_superuser:
            return True
        if principal.role == AGENT:
            return project_id == principal.project_id
        key = (principal.label, principal.project_id, project_id)  # a limited key apart
        if self._projects.get(key, 0.0) > time.monotonic():
            return True
        try:
            await self._stub.GetProject(agent_service_pb2.GetProjectRequest(project_id=project_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in UNSEEN:
                return False
            raise
        if len(self._projects) > tuning.MAX_CACHED_ENTRIES:
            self._projects.clear()
        self._projects[key] = time.monotonic() + self._cache_s
        return True

    async def require_project(self, project_id: str) -> None:
        """NOT_FOUND unless the project exists and the current caller may see it."""
        try:
            await self._stub.GetProject(agent_service_pb2.GetProjectRequest(project_id=project_id))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in UNSEEN:
                raise errors.not_found("project", project_id) from None
            raise

    async def find_agent(self, agent_id: str) -> agent_pb2.Agent | None:
        """The agent (BASIC view) if the caller may see it, else None. Never cached:
        callers act on its status, which must be current."""
        try:
            return await self._stub.GetAgent(
                agent_service_pb2.GetAgentRequest(
                    agent_id=agent_id, view=agent_service_pb2.AGENT_VIEW_BASIC
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in UNSEEN:
                return None
            raise

    async def project_of_agent(self, agent_id: str) -> str | None:
        """The project of an agent the caller may see, else None. An agent never moves, so
        the answer is cached per caller for AUTH_CACHE_SECONDS."""
        principal = current_principal()
        key = (principal.label, principal.project_id, agent_id)
        cached = self._agent_projects.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found = await self.find_agent(agent_id)
        if found is None:
            return None
        if len(self._agent_projects) > tuning.MAX_CACHED_ENTRIES:
            self._agent_projects.clear()
        self._agent_projects[key] = (time.monotonic() + self._cache_s, found.project_id)
        return found.project_id

    async def agent(self, agent_id: str) -> agent_pb2.Agent:
        """The agent (BASIC view); NOT_FOUND when the caller cannot see it."""
        found = await self.find_agent(agent_id)
        if found is None:
            raise errors.not_found("agent", agent_id)
        return found
