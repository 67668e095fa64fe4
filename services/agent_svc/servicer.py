"""AgentService: checks requests, calls the store, maps records to messages."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from grpc.aio import ServicerContext

from agentplane.agent.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    agent_type_pb2,
    api_key_pb2,
    project_pb2,
)
from agentplane.thread.v1 import thread_pb2, thread_service_pb2
from agentplane.usage.v1 import usage_pb2, usage_service_pb2
from services.agent_svc import lifecycle
from services.agent_svc.records import (
    agent_message,
    key_message,
    memory_text,
    project_message,
    type_fields,
    type_message,
)
from services.agent_svc.store import (
    ALL,
    AgentChange,
    AgentRecord,
    AgentStorage,
    KeyRecord,
    Outcome,
    ProjectRecord,
    TypeRecord,
)
from services.common import access, enums, errors, tuning
from services.common.auth import AGENT, OWNER, SUPERUSER, Principal, token_hash
from services.common.clients import PeerClients
from services.common.context import current_principal
from services.common.convert import (
    new_id,
    now_ms,
    require_client_id,
    require_id,
    require_slug,
    require_text,
    timestamp,
)
from services.common.interceptors import stream_open
from services.common.limits import (
    MAX_DESCRIPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_MODEL_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PEERS,
    MAX_REF_LENGTH,
    MAX_SCHEMA_BYTES,
    MAX_TITLE_LENGTH,
)
from services.common.logging import get_logger
from services.common.pagination import parse_page

log = get_logger("agentplane.agent")


AGENT_FIELDS = {
    "name", "description", "status", "current_task", "short_term_memory",
    "long_term_memory_ref", "session_id", "peers",
}  # fmt: skip
TYPE_FIELDS = {
    "display_name",
    "description",
    "default_model",
    "is_active",
    "input_schema",
    "example",
}


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, store: AgentStorage, peers: PeerClients, stopping: asyncio.Event) -> None:
        self._store = store
        self._peers = peers
        self._stopping = stopping

    # Projects -----------------------------------------------------------------------

    async def CreateProject(
        self, request: agent_service_pb2.CreateProjectRequest, context: ServicerContext
    ) -> project_pb2.Project:
        project = request.project
        chosen = request.project_id or project.id
        project_id = require_slug("project_id", chosen) if chosen else new_id().lower()
        fields = {
            "id": project_id,
            "display_name": require_text(
                "project.display_name", project.display_name, MAX_TITLE_LENGTH
            ),
            "owner": access.owner_of_new_project(
                current_principal(), require_text("project.owner", project.owner, MAX_TITLE_LENGTH)
            ),
            "create_ms": str(now_ms()),
        }
        if not await self._store.create_project(fields):
            raise errors.already_exists("project", project_id)
        return project_message(ProjectRecord.of(fields))

    async def GetProject(
        self, request: agent_service_pb2.GetProjectRequest, context: ServicerContext
    ) -> project_pb2.Project:
        return project_message(await self._project(request.project_id))

    async def ListProjects(
        self, request: agent_service_pb2.ListProjectsRequest, context: ServicerContext
    ) -> agent_service_pb2.ListProjectsResponse:
        principal = current_principal()
        page = parse_page(request.page_size, request.page_token, request.skip, ("projects",))
        if principal.project_id and not principal.is_superuser:  # an agent, a limited key
            own = await self._store.get_project(principal.project_id)
            shown = (
                [own]
                if own is not None and access.can_see_project(principal, own.id, own.owner)
                else []
            )
            return agent_service_pb2.ListProjectsResponse(
                projects=[project_message(r) for r in shown], total_size=len(shown)
            )
        owner = None if principal.is_superuser else principal.subject
        records, token, total = await self._store.list_projects(page, owner)
        return agent_service_pb2.ListProjectsResponse(
            projects=[project_message(r) for r in records], next_page_token=token, total_size=total
        )

    # Agent types --------------------------------------------------------------------

    async def CreateAgentType(
        self, request: agent_service_pb2.CreateAgentTypeRequest, context: ServicerContext
    ) -> agent_type_pb2.AgentType:
        access.require_superuser("creating agent types")
        agent_type = request.agent_type
        type_id = require_slug("agent_type.id", agent_type.id)
        require_text("agent_type.display_name", agent_type.display_name, MAX_TITLE_LENGTH)
        _check_type_fields(agent_type, "agent_type")
        fields = {"id": type_id, "create_ms": str(now_ms()), **type_fields(agent_type)}
        if not await self._store.create_type(fields):
            raise errors.already_exists("agent_type", type_id)
        return type_message(TypeRecord.of(fields))

    async def GetAgentType(
        self, request: agent_service_pb2.GetAgentTypeRequest, context: ServicerContext
    ) -> agent_type_pb2.AgentType:
        return type_message(await self._type(request.agent_type_id))

    async def ListAgentTypes(
        self, request: agent_service_pb2.ListAgentTypesRequest, context: ServicerContext
    ) -> agent_service_pb2.ListAgentTypesResponse:
        page = parse_page(
            request.page_size, request.page_token, request.skip, ("types", request.active_only)
        )
        records, token, total = await self._store.list_types(page, request.active_only)
        return agent_service_pb2.ListAgentTypesResponse(
            agent_types=[type_message(r) for r in records], next_page_token=token, total_size=total
        )

    async def UpdateAgentType(
        self, request: agent_service_pb2.UpdateAgentTypeRequest, context: ServicerContext
    ) -> agent_type_pb2.AgentType:
        access.require_superuser("changing agent types")
        type_id = request.agent_type_id or request.agent_type.id
        require_slug("agent_type_id", type_id)
        if request.agent_type.id and request.agent_type.id != type_id:
            raise errors.invalid_argument("agent_type.id", "does not match agent_type_id")
        paths = _mask_paths(request.update_mask, TYPE_FIELDS, request.agent_type)
        _check_type_fields(request.agent_type, "agent_type")
        if "display_name" in paths:
            require_text(
                "agent_type.display_name",
                request.agent_type.display_name,
                MAX_TITLE_LENGTH,
            )
        await self._type(type_id)
        stored = type_fields(request.agent_type)
        await self._store.update_type(type_id, {p: stored[p] for p in paths})
        return type_message(await self._type(type_id))

    # Agents -------------------------------------------------------------------------

    async def SpawnAgent(
        self, request: agent_service_pb2.SpawnAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        access.require_manager()
        project_id = require_id("project_id", request.project_id)
        await self._project(project_id)
        agent = request.agent
        request_id = require_client_id("request_id", request.request_id, "")
        type_id = require_slug("agent.agent_type_id", agent.agent_type_id)
        name = require_text("agent.name", agent.name, MAX_NAME_LENGTH)
        agent_type = await self._store.get_type(type_id)
        if agent_type is None:
            raise errors.not_found("agent_type", type_id)
        if not agent_type.is_active:
            raise errors.failed_precondition(
                f"agent type {type_id!r} is inactive", "AGENT_TYPE_INACTIVE", agent_type=type_id
            )
        now = str(now_ms())
        fields = {
            "id": new_id(),
            "project_id": project_id,
            "agent_type_id": type_id,
            "name": name,
            "status": lifecycle.IDLE,
            "create_ms": now,
            "update_ms": now,
            "last_activity_ms": now,
            "tasks_completed": "0",
            **_agent_fields(agent, {"description", "current_task", "short_term_memory",
                                    "long_term_memory_ref", "session_id", "peers"}),
        }  # fmt: skip
        spawned = await self._store.spawn(fields, request_id)
        if spawned.outcome == Outcome.NO_PROJECT:
            raise errors.not_found("project", project_id)
        if spawned.outcome == Outcome.NAME_TAKEN:
            raise errors.already_exists(
                "agent", name, f"an agent named {name!r} already exists in project {project_id!r}"
            )
        return (await self._agents_with_usage([await self._agent_record(spawned.detail)]))[0]

    async def GetAgent(
        self, request: agent_service_pb2.GetAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        record = await self._agent_record(request.agent_id, request.project_id)
        if request.view == agent_service_pb2.AGENT_VIEW_BASIC:
            return agent_message(record)
        return (await self._agents_with_usage([record]))[0]

    async def ListAgents(
        self, request: agent_service_pb2.ListAgentsRequest, context: ServicerContext
    ) -> agent_service_pb2.ListAgentsResponse:
        project_id = request.project_id or ALL
        if project_id == ALL:
            access.require_superuser("listing agents of every project")
        else:
            await self._project(project_id)
        status = lifecycle.status_name(request.status) if request.status else ""
        page = parse_page(
            request.page_size, request.page_token, request.skip, ("agents", project_id, status)
        )
        records, token, total = await self._store.list_agents(project_id, status, page)
        return agent_service_pb2.ListAgentsResponse(
            agents=await self._agents_with_usage(records), next_page_token=token, total_size=total
        )

    async def UpdateAgent(
        self, request: agent_service_pb2.UpdateAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        access.require_manager()
        agent_id = request.agent_id or request.agent.id
        if request.agent.id and request.agent.id != agent_id:
            raise errors.invalid_argument("agent.id", "does not match agent_id")
        paths = _mask_paths(request.update_mask, AGENT_FIELDS, None)
        new_name, target, sets, deletes = _agent_update(request.agent, paths)
        return await self._change(
            request.agent_id or agent_id, request.project_id, target,
            new_name=new_name, delete_fields=deletes, set_fields=sets,
        )  # fmt: skip

    async def PauseAgent(
        self, request: agent_service_pb2.PauseAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        return await self._move(request, lifecycle.PAUSED)

    async def ResumeAgent(
        self, request: agent_service_pb2.ResumeAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        return await self._move(request, lifecycle.IDLE, from_states=(lifecycle.PAUSED,))

    async def TerminateAgent(
        self, request: agent_service_pb2.TerminateAgentRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        return await self._move(request, lifecycle.TERMINATED)

    async def StartTask(
        self, request: agent_service_pb2.StartTaskRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        task = require_text("task", request.task, MAX_DESCRIPTION_LENGTH)
        return await self._move(
            request, lifecycle.WORKING, from_states=(lifecycle.IDLE, lifecycle.WAITING),
            set_fields={"current_task": task}, by_itself=True,
        )  # fmt: skip

    async def CompleteTask(
        self, request: agent_service_pb2.CompleteTaskRequest, context: ServicerContext
    ) -> agent_pb2.Agent:
        return await self._move(
            request, lifecycle.IDLE, from_states=(lifecycle.WORKING,), tasks_completed=1,
            by_itself=True,
        )  # fmt: skip

    async def GetAgentSchema(
        self, request: agent_service_pb2.GetAgentSchemaRequest, context: ServicerContext
    ) -> agent_service_pb2.AgentSchema:
        record = await self._agent_record(request.agent_id)
        agent_type = await self._type(record.agent_type_id)
        return agent_service_pb2.AgentSchema(
            schema=agent_type.input_schema, content_type="application/schema+json"
        )

    # Metrics ------------------------------------------------------------------------

    async def GetAgentMetrics(
        self, request: agent_service_pb2.GetAgentMetricsRequest, context: ServicerContext
    ) -> agent_pb2.AgentMetrics:
        agent = (
            await self._agents_with_usage(
                [await self._agent_record(request.agent_id, request.project_id)]
            )
        )[0]
        end_ms = (
            agent.terminate_time.ToMilliseconds() if agent.HasField("terminate_time") else now_ms()
        )
        return agent_pb2.AgentMetrics(
            agent_id=agent.id,
            project_id=agent.project_id,
            status=agent.status,
            tasks_completed=agent.tasks_completed,
            tokens_used=agent.tokens_used,
            cost_usd=agent.cost_usd,
            uptime_seconds=max(0, (end_ms - agent.create_time.ToMilliseconds()) // 1000),
            last_activity_time=agent.last_activity_time,
        )

    async def GetProjectAgentMetrics(
        self,
        request: agent_service_pb2.GetProjectAgentMetricsRequest,
        context: ServicerContext,
    ) -> agent_pb2.ProjectAgentMetrics:
        project = await self._project(request.project_id)
        usage = await self._peer(
            "usage", self._peers.usage.GetUsageOverview,
            usage_service_pb2.GetUsageOverviewRequest(project_id=project.id),
        )  # fmt: skip
        totals = usage.totals if usage is not None else usage_pb2.UsageTotals()
        count = project.agents_by_status.get
        return agent_pb2.ProjectAgentMetrics(
            project_id=project.id,
            total_instances=project.agents_total,
            active_instances=count(lifecycle.WORKING, 0),
            idle_instances=count(lifecycle.IDLE, 0),
            waiting_instances=count(lifecycle.WAITING, 0),
            paused_instances=count(lifecycle.PAUSED, 0),
            terminated_instances=count(lifecycle.TERMINATED, 0),
            total_tasks_completed=project.tasks_completed,
            total_tokens_used=totals.total_tokens,
            total_cost_usd=totals.total_cost_usd,
        )

    async def GetOverview(
        self, request: agent_service_pb2.GetOverviewRequest, context: ServicerContext
    ) -> agent_service_pb2.Overview:
        access.require_superuser("the cluster overview")
        counters, threads, usage = await asyncio.gather(
            self._store.counters(),
            self._thread_counts(),
            self._peer("usage", self._peers.usage.GetUsageOverview,
                       usage_service_pb2.GetUsageOverviewRequest()),
        )  # fmt: skip
        overview = agent_service_pb2.Overview(
            project_count=counters.get("projects", 0),
            agent_type_count=counters.get("agent_types", 0),
            agents=agent_service_pb2.AgentStatusCounts(
                total=counters.get("agents", 0),
                **{s.lower(): counters.get(f"n_{s}", 0) for s in lifecycle.MOVES},
            ),
        )
        if threads is None:
            overview.unavailable_sources.append("thread")
        else:
            overview.threads.CopyFrom(threads)
        if usage is None:
            overview.unavailable_sources.append("usage")
        else:
            overview.usage.CopyFrom(usage.totals)
        return overview

    async def WatchAgents(
        self, request: agent_service_pb2.WatchAgentsRequest, context: ServicerContext
    ) -> AsyncIterator[agent_pb2.AgentEvent]:
        project_id = request.project_id or ALL
        if project_id == ALL:
            access.require_superuser("watching every project")
        else:
            await self._project(project_id)
        after = await self._store.last_event_id(project_id)
        stream = await stream_open(context, self._stopping)
        while stream.active:
            for event in await self._store.read_events(project_id, after, tuning.STREAM_BLOCK_MS):
                after = event.entry_id
                record = await self._store.get_agent(event.agent_id)
                if record is None:
                    continue
                previous = event.previous_status
                yield agent_pb2.AgentEvent(
                    agent=agent_message(record),
                    previous_status=(
                        lifecycle.status_value(previous)
                        if previous
                        else agent_pb2.AGENT_STATUS_UNSPECIFIED
                    ),
                    event_time=timestamp(event.ms),
                )

    # API keys and principals -------------------------------------------------------

    async def CreateApiKey(
        self, request: agent_service_pb2.CreateApiKeyRequest, context: ServicerContext
    ) -> agent_service_pb2.CreateApiKeyResponse:
        principal = current_principal()
        access.require_manager(principal)
        if (
            request.role == api_key_pb2.API_KEY_ROLE_UNSPECIFIED
            or request.role not in api_key_pb2.ApiKeyRole.values()
        ):
            raise errors.invalid_argument("role", "must be SUPERUSER, OWNER or AGENT")
        role = enums.short_name(api_key_pb2.ApiKeyRole, request.role)
        project_id = require_id("project_id", request.project_id) if request.project_id else ""
        if role == SUPERUSER:
            access.require_superuser("creating superuser keys", principal)
            subject = require_text("subject", request.subject, MAX_NAME_LENGTH) or "superuser"
        elif role == OWNER:
            subject = require_slug("subject", request.subject or principal.subject)
            if subject != principal.subject:
                access.require_superuser("creating keys for other principals", principal)
            project_id = access.project_limit_of_new_key(principal, project_id)
            if project_id and not principal.is_superuser:
                await self._project(project_id)  # a limit to a project of one's own
        else:
            agent = await self._agent_record(require_id("subject", request.subject))
            subject, project_id = agent.id, agent.project_id
        key_id = new_id().lower()
        token = f"apk_{key_id}.{secrets.token_urlsafe(32)}"
        fields = {
            "key_id": key_id, "role": role, "subject": subject, "project_id": project_id,
            "hash": token_hash(token), "create_ms": str(now_ms()), "revoked": "0",
            "created_by": principal.subject,
        }  # fmt: skip
        await self._store.create_key(fields, visible_to=[principal.subject, subject])
        return agent_service_pb2.CreateApiKeyResponse(
            api_key=key_message(KeyRecord.of(fields)), token=token
        )

    async def ListApiKeys(
        self, request: agent_service_pb2.ListApiKeysRequest, context: ServicerContext
    ) -> agent_service_pb2.ListApiKeysResponse:
        principal = current_principal()
        access.require_manager(principal)
        visible_to = None if principal.is_superuser else principal.subject
        page = parse_page(request.page_size, request.page_token, 0, ("keys", visible_to))
        records, token, total = await self._store.list_keys(page, visible_to)
        if principal.project_id and not principal.is_superuser:
            # A limited key sees the keys of its project only (total_size: on this page).
            records = [r for r in records if r.project_id == principal.project_id]
            total = len(records)
        return agent_service_pb2.ListApiKeysResponse(
            api_keys=[key_message(r) for r in records], next_page_token=token, total_size=total
        )

    async def RevokeApiKey(
        self, request: agent_service_pb2.RevokeApiKeyRequest, context: ServicerContext
    ) -> api_key_pb2.ApiKey:
        principal = current_principal()
        access.require_manager(principal)
        key_id = require_id("key_id", request.key_id)
        record = await self._store.get_key(key_id)
        mine = record is not None and principal.subject in (record.created_by, record.subject)
        if mine and principal.project_id and record is not None:
            mine = record.project_id == principal.project_id  # a limited key: its project's
        if record is None or not (principal.is_superuser or mine):
            raise errors.not_found("api_key", key_id)
        await self._store.revoke_key(key_id)
        return key_message(dataclasses.replace(record, revoked=True))

    async def WhoAmI(
        self, request: agent_service_pb2.WhoAmIRequest, context: ServicerContext
    ) -> api_key_pb2.Principal:
        principal = current_principal()
        return api_key_pb2.Principal(
            role=enums.value_of(api_key_pb2.ApiKeyRole, principal.role),
            subject=principal.subject,
            project_id=principal.project_id,
            key_id=principal.key_id,
            agent_terminated=principal.agent_terminated,
        )

    async def principal_for_key(self, key_id: str, token: str) -> Principal | None:
        """The authenticator's lookup: a live key whose stored hash matches the token."""
        record = await self._store.get_key(key_id)
        if record is None or record.revoked:
            return None
        if not hmac.compare_digest(record.token_hash, token_hash(token)):
            return None
        terminated = False
        if record.role == AGENT:
            agent = await self._store.get_agent(record.subject)
            terminated = agent is None or agent.status == "TERMINATED"
        return Principal(record.role, record.subject, record.project_id, key_id, terminated)

    # Helpers ------------------------------------------------------------------------

    async def _project(self, project_id: str) -> ProjectRecord:
        record = await self._store.get_project(require_id("project_id", project_id))
        if record is None or not access.can_see_project(
            current_principal(), record.id, record.owner
        ):
            raise errors.not_found("project", project_id)
        return record

    async def _type(self, type_id: str) -> TypeRecord:
        record = await self._store.get_type(require_id("agent_type_id", type_id))
        if record is None:
            raise errors.not_found("agent_type", type_id)
        return record

    async def _agent_record(self, agent_id: str, project_id: str = "") -> AgentRecord:
        record = await self._store.get_agent(require_id("agent_id", agent_id))
        # An agent of another project answers exactly like one that does not exist.
        if record is None or (project_id and record.project_id != project_id):
            raise errors.not_found("agent", agent_id)
        principal = current_principal()
        if not principal.is_superuser:
            project = await self._store.get_project(record.project_id)
            if project is None or not access.can_see_project(principal, project.id, project.owner):
                raise errors.not_found("agent", agent_id)
        return record

    async def _move(
        self,
        request: object,
        target: str,
        from_states: Sequence[str] | None = None,
        set_fields: dict[str, str] | None = None,
        tasks_completed: int = 0,
        by_itself: bool = False,
    ) -> agent_pb2.Agent:
        """A lifecycle move; `by_itself`: an agent's own token may make it (its task
        bookkeeping), otherwise only managers."""
        if by_itself:
            access.require_manager_or_self(request.agent_id)  # type: ignore[attr-defined]
        else:
            access.require_manager()
        cleared, extra = lifecycle.effects(target, now_ms())
        sets = {**extra, **(set_fields or {})}
        return await self._change(
            request.agent_id, request.project_id, target,  # type: ignore[attr-defined]
            from_states=from_states, tasks_completed=tasks_completed,
            delete_fields=[f for f in cleared if f not in sets], set_fields=sets,
        )  # fmt: skip

    async def _change(
        self,
        agent_id: str,
        project_check: str,
        target: str,
        *,
        from_states: Sequence[str] | None = None,
        new_name: str = "",
        tasks_completed: int = 0,
        delete_fields: Sequence[str] = (),
        set_fields: dict[str, str] | None = None,
    ) -> agent_pb2.Agent:
        record = await self._agent_record(agent_id, project_check)
        change = AgentChange(
            agent_id=agent_id,
            project_check=project_check,
            target_status=target,
            allowed_from=tuple(
                from_states if from_states is not None else lifecycle.allowed_from(target)
            ),
            new_name=new_name,
            tasks_completed=tasks_completed,
            delete_fields=tuple(delete_fields),
            set_fields=set_fields,
        )
        changed = await self._store.update(change, record.project_id)
        if changed.outcome == Outcome.NOT_FOUND:
            raise errors.not_found("agent", agent_id)
        if changed.outcome == Outcome.BAD_STATE:
            raise lifecycle.refused(changed.detail, target)
        if changed.outcome == Outcome.NAME_TAKEN:
            raise errors.already_exists(
                "agent", new_name, f"an agent named {new_name!r} already exists"
            )
        return (await self._agents_with_usage([await self._agent_record(agent_id)]))[0]

    async def _agents_with_usage(self, records: Sequence[AgentRecord]) -> list[agent_pb2.Agent]:
        """Agents with display names and, from the usage service, tokens and cost.

        A usage service that is down leaves the usage fields at zero (and logs a warning):
        it must never make an agent unreadable.
        """
        if not records:
            return []
        # One call to the usage service for the whole page (it trusts this service's
        # judgement of what the caller may see: the call carries the internal proof).
        (type_names, project_names), batch = await asyncio.gather(
            self._store.display_names(
                (r.agent_type_id for r in records), (r.project_id for r in records)
            ),
            self._peer("usage", self._peers.usage.BatchGetAgentUsage,
                       usage_service_pb2.BatchGetAgentUsageRequest(
                           agent_ids=[r.id for r in records]), quiet=True),
        )  # fmt: skip
        usages = list(batch.usages) if batch is not None else [None] * len(records)
        agents = []
        for record, usage in zip(records, usages, strict=True):
            agent = agent_message(
                record,
                type_names.get(record.agent_type_id, ""),
                project_names.get(record.project_id, ""),
            )
            if usage is not None:
                agent.tokens_used = usage.totals.total_tokens
                agent.cost_usd = usage.totals.total_cost_usd
            agents.append(agent)
        if any(u is None for u in usages):
            log.warning("usage service unavailable; agents' usage fields left empty")
        return agents

    async def _thread_counts(self) -> agent_service_pb2.ThreadStatusCounts | None:
        statuses = ("ACTIVE", "COMPLETED", "FAILED", "KILLED")
        requests = [
            thread_service_pb2.ListThreadsRequest(
                project_id=ALL,
                status=enums.value_of(thread_pb2.ThreadStatus, s),
                page_size=1,
            )
            for s in statuses
        ]
        replies = await asyncio.gather(
            *(self._peer("thread", self._peers.thread.ListThreads, r) for r in requests)
        )
        if any(r is None for r in replies):
            return None
        counts = {s.lower(): r.total_size for s, r in zip(statuses, replies, strict=True)}
        return agent_service_pb2.ThreadStatusCounts(total=sum(counts.values()), **counts)

    async def _peer(
        self, name: str, method: Callable[..., Awaitable[Any]], request: Message, *,
        quiet: bool = False,
    ) -> Any:  # fmt: skip
        """Call a peer with a short deadline; None (and a warning) when it cannot answer."""
        try:
            return await method(request, timeout=tuning.PEER_LOOKUP_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if not quiet:
                log.warning("peer unavailable", peer=name, code=exc.code().name)
            return None


def _mask_paths(mask: field_mask_pb2.FieldMask, allowed: set[str], message: object) -> set[str]:
    """The update mask's paths, checked; for types an empty mask means "the fields set"."""
    paths = set(mask.paths)
    if not paths and message is not None:
        paths = {f.name for f, _ in message.ListFields() if f.name in allowed}  # type: ignore[attr-defined]
    if not paths:
        raise errors.invalid_argument("update_mask", "names no field to update")
    unknown = sorted(paths - allowed)
    if unknown:
        raise errors.invalid_argument("update_mask", f"cannot update {', '.join(unknown)}")
    return paths


def _check_type_fields(agent_type: agent_type_pb2.AgentType, prefix: str) -> None:
    require_text(f"{prefix}.description", agent_type.description, MAX_DESCRIPTION_LENGTH)
    require_text(f"{prefix}.default_model", agent_type.default_model, MAX_MODEL_LENGTH)
    require_text(f"{prefix}.example", agent_type.example, MAX_SCHEMA_BYTES)
    if agent_type.input_schema:
        if len(agent_type.input_schema) > MAX_SCHEMA_BYTES:
            raise errors.invalid_argument(
                f"{prefix}.input_schema", f"is larger than {MAX_SCHEMA_BYTES} characters"
            )
        try:
            json.loads(agent_type.input_schema)
        except ValueError:
            raise errors.invalid_argument(f"{prefix}.input_schema", "is not valid JSON") from None


def _agent_update(
    agent: agent_pb2.Agent, paths: set[str]
) -> tuple[str, str, dict[str, str], list[str]]:
    """What an UpdateAgent changes: (new name, target status, fields to set, to delete)."""
    fields = _agent_fields(agent, paths - {"status", "name"})
    deletes = [f for f, v in fields.items() if v == ""]
    sets = {f: v for f, v in fields.items() if v != ""}
    new_name = ""
    if "name" in paths:
        new_name = require_text("agent.name", agent.name, MAX_NAME_LENGTH)
        sets["name"] = new_name
    target = lifecycle.status_name(agent.status) if "status" in paths else ""
    if target:
        cleared, extra = lifecycle.effects(target, now_ms())
        deletes += [f for f in cleared if f not in sets]
        sets.update(extra)
    return new_name, target, sets, deletes


def _agent_fields(agent: agent_pb2.Agent, names: set[str]) -> dict[str, str]:
    """Stored values of the named agent fields, checked."""
    fields: dict[str, str] = {}
    limits = {
        "description": MAX_DESCRIPTION_LENGTH,
        "current_task": MAX_DESCRIPTION_LENGTH,
        "long_term_memory_ref": MAX_REF_LENGTH,
        "session_id": MAX_ID_LENGTH,
    }
    for name, limit in limits.items():
        if name in names:
            fields[name] = require_text(f"agent.{name}", getattr(agent, name), limit)
    if "short_term_memory" in names:
        fields["short_term_memory"] = (
            memory_text(agent.short_term_memory, "agent.short_term_memory")
            if agent.HasField("short_term_memory") else ""
        )  # fmt: skip
    if "peers" in names:
        if len(agent.peers) > MAX_PEERS:
            raise errors.invalid_argument("agent.peers", f"has more than {MAX_PEERS} agents")
        fields["peers"] = json.dumps([require_id("agent.peers", p) for p in agent.peers])
    return fields
