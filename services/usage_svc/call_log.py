"""The model gateway's call log (SPEC §14): one entry per call, metadata only.

A project keeps its calls in one score-0 sorted set in its partition, members
`<call ulid>|<ModelCall, base64>`: lexical order is time order, so a page is one range
read newest first, and retention is a lexical cut at the ULID of `now - retention`. A
call with usage is logged by record_usage.lua in the same step as its record (and only
when the record is new, so a retried settle logs once); a call without usage (a refusal,
an upstream error that reported none) by `LogModelCall` alone.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from grpc.aio import ServicerContext
from ulid import ULID

from agentplane.usage.v1 import usage_pb2, usage_service_pb2
from services.common import errors
from services.common.auth import AGENT
from services.common.context import current_principal
from services.common.convert import RESPONSE_ID, now_ms, require_id, require_model
from services.common.pagination import parse_page
from services.common.peers import AgentClient
from services.common.redis import RedisClient
from services.common.settings import Settings
from services.usage_svc.keys import Layout
from services.usage_svc.thread_budgets import script

SCAN_BATCH = 200  # entries read per round trip while filtering
SCAN_LIMIT = 5_000  # entries one ListModelCalls request looks at, at most


@dataclass(frozen=True, slots=True)
class CallLogPolicy:
    retention_ms: int
    most: int

    @classmethod
    def from_settings(cls, settings: Settings) -> CallLogPolicy:
        return cls(int(settings.call_log_retention_s * 1000), settings.call_log_max)

    def cutoff(self, now: int) -> str:
        """The time prefix of a ULID made `retention` ago: entries below it are gone."""
        return str(ULID.from_timestamp(max(0, now - self.retention_ms) / 1000))[:10]


DEFAULT_CALL_LOG = CallLogPolicy(7 * 86_400_000, 50_000)  # CALL_LOG_RETENTION's defaults


def call_member(call: usage_pb2.ModelCall) -> str:
    """The log entry of a call: its ULID, then the message (base64 holds no '|')."""
    body = base64.b64encode(call.SerializeToString(deterministic=True)).decode()
    return f"{call.call_id}|{body}"


def require_call(call: usage_pb2.ModelCall, field: str) -> None:
    """A call id must be a ULID (its time orders the log); the ids must be sane."""
    try:
        ULID.from_str(call.call_id)
    except ValueError:
        raise errors.invalid_argument(f"{field}.call_id", "must be a ULID") from None
    require_id(f"{field}.project_id", call.project_id)
    for name in ("agent_id", "thread_id", "api_key_id"):
        if getattr(call, name):
            require_id(f"{field}.{name}", getattr(call, name))
    for name in ("model_requested", "model"):
        if getattr(call, name):
            require_model(f"{field}.{name}", getattr(call, name))
    if call.response_id and not RESPONSE_ID.fullmatch(call.response_id):
        raise errors.invalid_argument(
            f"{field}.response_id", "must be 1 to 128 letters, digits or '_.:-'"
        )
    if len(call.reason) > 1024 or len(call.provider) > 128 or len(call.operation) > 64:
        raise errors.invalid_argument(f"{field}.reason", "reason, provider or operation too long")


class CallLog:
    def __init__(self, redis: RedisClient, layout: Layout, policy: CallLogPolicy) -> None:
        self._redis = redis
        self._layout = layout
        self._policy = policy
        self._log = script(redis, "log_call")

    async def log(self, call: usage_pb2.ModelCall) -> None:
        prefix = self._layout.partition(call.project_id).prefix
        await self._log(
            keys=[prefix],
            args=[call_member(call), self._policy.cutoff(now_ms()), self._policy.most],
        )

    async def metered(self, project_id: str, response_ids: list[str]) -> set[str]:
        """Which of these provider answer ids the model gateway metered (one read: a
        project's keys share its partition's slot)."""
        if not response_ids:
            return set()
        prefix = self._layout.partition(project_id).prefix + "resp:"
        found = await self._redis.execute_command("MGET", *(prefix + i for i in response_ids))
        return {i for i, value in zip(response_ids, found, strict=True) if value is not None}

    async def scan(
        self, project_id: str, before: str, after: str, count: int
    ) -> list[tuple[str, usage_pb2.ModelCall]]:
        """Up to `count` entries newest first, below the ULID `before` ('' for the newest)
        and at or above the time prefix `after`."""
        key = self._layout.partition(project_id).prefix + "calls"
        start = f"({before}" if before else "+"
        members = await self._redis.execute_command(
            "ZRANGE", key, start, f"[{after}", "BYLEX", "REV", "LIMIT", 0, count
        )
        found = []
        for member in members:
            text = member.decode() if isinstance(member, bytes) else member
            call_id, _, body = text.partition("|")
            found.append((call_id, usage_pb2.ModelCall.FromString(base64.b64decode(body))))
        return found


class CallFilter:
    """A checked ListModelCalls request's filters."""

    def __init__(self, request: usage_service_pb2.ListModelCallsRequest, agent: str) -> None:
        self.agent = agent
        self.thread = require_id("thread_id", request.thread_id) if request.thread_id else ""
        self.model = require_model("model", request.model) if request.model else ""
        self.outcome = request.outcome
        self.start_ms = request.start_time.ToMilliseconds() if request.HasField("start_time") else 0
        self.end_ms = request.end_time.ToMilliseconds() if request.HasField("end_time") else 0

    def keeps(self, call: usage_pb2.ModelCall) -> bool:
        return (
            (not self.agent or call.agent_id == self.agent)
            and (not self.thread or call.thread_id == self.thread)
            and (not self.model or call.model_requested == self.model)
            and (not self.outcome or call.outcome == self.outcome)
            and (not self.end_ms or call.start_time.ToMilliseconds() < self.end_ms)
        )

    def key(self) -> tuple[object, ...]:
        return (self.agent, self.thread, self.model, self.outcome, self.start_ms, self.end_ms)


class CallLogRpcs:
    """LogModelCall and ListModelCalls of the UsageService."""

    _calls: CallLog
    _agents: AgentClient
    _call_policy: CallLogPolicy

    async def LogModelCall(
        self, request: usage_service_pb2.LogModelCallRequest, context: ServicerContext
    ) -> usage_pb2.ModelCall:
        call = request.call
        require_call(call, "call")
        await self._may_log(call)
        await self._calls.log(call)
        return call

    async def _may_log(self, call: usage_pb2.ModelCall) -> None:
        """An agent logs only its own calls in its project; an owner in projects it sees."""
        principal = current_principal()
        if principal.role == AGENT:
            if call.project_id != principal.project_id or call.agent_id != principal.subject:
                raise errors.permission_denied(
                    "an agent token logs only its own calls in its project", "NOT_SELF"
                )
        elif not await self._agents.can_see_project(call.project_id):
            raise errors.not_found("project", call.project_id)

    async def _calls_visible_to_caller(self, project_id: str, agent_id: str) -> str:
        """The agent whose calls the caller may list ('' for all): an agent token sees its
        own; an owner any in projects it sees."""
        principal = current_principal()
        agent = require_id("agent_id", agent_id) if agent_id else ""
        if principal.role == AGENT:
            if project_id != principal.project_id:
                raise errors.not_found("project", project_id)
            return principal.subject
        if not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        return agent

    async def ListModelCalls(
        self, request: usage_service_pb2.ListModelCallsRequest, context: ServicerContext
    ) -> usage_service_pb2.ListModelCallsResponse:
        project_id = require_id("project_id", request.project_id)
        agent = await self._calls_visible_to_caller(project_id, request.agent_id)
        wanted = CallFilter(request, agent)
        page = parse_page(request.page_size, request.page_token, 0, wanted.key(), 50)
        floor = max(wanted.start_ms, now_ms() - self._call_policy.retention_ms)
        after = str(ULID.from_timestamp(floor / 1000))[:10]
        before, looked = page.cursor or "", 0
        response = usage_service_pb2.ListModelCallsResponse()
        while len(response.calls) < page.size and looked < SCAN_LIMIT:
            batch = await self._calls.scan(project_id, before, after, SCAN_BATCH)
            for call_id, call in batch:
                looked += 1
                before = call_id
                if wanted.keeps(call):
                    response.calls.append(call)
                    if len(response.calls) == page.size:
                        break
            if len(batch) < SCAN_BATCH and len(response.calls) < page.size:
                return response  # the end of the log
        response.next_page_token = page.token_after(before)
        return response
