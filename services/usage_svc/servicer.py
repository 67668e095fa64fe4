"""UsageService: checks requests, resolves costs, calls the store, maps the answers."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Sequence

from google.rpc import code_pb2, status_pb2
from grpc.aio import ServicerContext

from agentplane.usage.v1 import usage_pb2, usage_service_pb2, usage_service_pb2_grpc
from services.common import errors, tuning
from services.common.access import require_manager, require_self, require_superuser
from services.common.auth import AGENT
from services.common.context import current_call_is_internal, current_principal
from services.common.convert import (
    now_ms,
    require_client_id,
    require_id,
    require_model,
    timestamp,
)
from services.common.limits import (
    DEFAULT_RESERVATION_TTL_MS,
    MAX_COST_USD,
    MAX_LATENCY_MS,
    MAX_PAGE_SIZE,
    MAX_RESERVATION_TTL_MS,
    MAX_TOKENS_PER_CALL,
)
from services.common.limits import MAX_BATCH_RECORDS as MAX_BATCH
from services.common.limits import MAX_BUDGET_TOKENS as MAX_BUDGET
from services.common.pagination import parse_page
from services.common.peers import AgentClient
from services.common.redis import RedisClient
from services.common.settings import Settings
from services.common.telemetry import BUDGET_REJECTIONS, COST_RECORDED, TOKENS_RECORDED
from services.common.validate import require_fields
from services.usage_svc.budget_rpcs import BudgetRpcs
from services.usage_svc.budget_store import BudgetStorage
from services.usage_svc.call_log import (
    CallLog,
    CallLogPolicy,
    CallLogRpcs,
    call_member,
    require_call,
)
from services.usage_svc.keys import Layout
from services.usage_svc.messages import totals_message
from services.usage_svc.pricing import PriceBook, PriceStore
from services.usage_svc.series_rpcs import SeriesRpcs
from services.usage_svc.store import UsageStorage
from services.usage_svc.usage_types import (
    BudgetState,
    Counters,
    Hold,
    Outcome,
    RecordOutcome,
    Refusal,
    UsageRecord,
)

_OK = status_pb2.Status(code=code_pb2.OK)
PROMPT_TOKENS = TOKENS_RECORDED.labels("prompt")
COMPLETION_TOKENS = TOKENS_RECORDED.labels("completion")


class UsageServicer(
    BudgetRpcs, SeriesRpcs, CallLogRpcs, usage_service_pb2_grpc.UsageServiceServicer
):
    def __init__(
        self,
        store: UsageStorage,
        budgets: BudgetStorage,
        prices: PriceStore,
        agents: AgentClient,
        settings: Settings,
        streams: RedisClient,
        stopping: asyncio.Event,
        calls: CallLog | None = None,
    ) -> None:
        self._store = store
        self._budgets = budgets
        self._prices = prices
        self._default_max_tokens = settings.default_max_tokens
        self._agents = agents
        self._settings = settings
        self._streams = streams
        self._stopping = stopping
        self._call_policy = CallLogPolicy.from_settings(settings)
        self._calls = calls or CallLog(streams, Layout(settings.usage_shards), self._call_policy)

    # Recording ----------------------------------------------------------------------

    async def RecordUsage(
        self, request: usage_service_pb2.RecordUsageRequest, context: ServicerContext
    ) -> usage_service_pb2.RecordUsageResponse:
        record = self._check_record(
            request, "", self._prices.fresh_book() or await self._prices.book()
        )
        if not current_principal().is_superuser:
            await self._may_record(record, "")
        outcome = await self._store.record_one(record)
        return self._record_answer(record, outcome)

    async def RecordUsageBatch(
        self, request: usage_service_pb2.RecordUsageBatchRequest, context: ServicerContext
    ) -> usage_service_pb2.RecordUsageBatchResponse:
        if len(request.requests) > MAX_BATCH:
            raise errors.invalid_argument("requests", f"holds more than {MAX_BATCH} records")
        answers, errors_at = await self.record_many(request.requests)
        response = usage_service_pb2.RecordUsageBatchResponse()
        for position, item in enumerate(request.requests):
            error = errors_at.get(position)
            if error is None:
                response.results.add(usage_id=item.usage_id, response=answers[position], status=_OK)
            else:
                response.results.add(usage_id=item.usage_id, status=error.to_proto())
        return response

    async def record_many(
        self, requests: Sequence[usage_service_pb2.RecordUsageRequest], spans: bool = False
    ) -> tuple[dict[int, usage_service_pb2.RecordUsageResponse], dict[int, errors.ServiceError]]:
        """Check and record a batch in one store call: (answers, errors) by position. The
        one path for RecordUsageBatch and usage from OpenTelemetry spans (`spans`: only
        the errors are wanted, no answers are built, and an owner's record may have no
        agent: it counts in every total but no agent's)."""
        errors_at: dict[int, errors.ServiceError] = {}
        valid: list[tuple[int, UsageRecord]] = []
        book = await self._prices.book()
        superuser = current_principal().is_superuser
        for position, item in enumerate(requests):
            prefix = f"requests[{position}]."
            try:
                record = self._check_record(item, prefix, book, agentless=spans)
                if not superuser:
                    await self._may_record(record, prefix)
                valid.append((position, record))
            except errors.ServiceError as exc:
                errors_at[position] = exc
        outcomes = await self._store.record([record for _, record in valid])
        answers: dict[int, usage_service_pb2.RecordUsageResponse] = {}
        new: list[tuple[UsageRecord, int]] = []  # (record, its cost)
        for (position, record), outcome in zip(valid, outcomes, strict=True):
            try:
                _refuse_outcome(record, outcome)
            except errors.ServiceError as exc:
                errors_at[position] = exc
                continue
            if outcome.outcome == Outcome.NEW:
                new.append((record, outcome.cost_micros))
            if not spans:
                answers[position] = _answer(outcome)
        _count_recorded(new)
        return answers, errors_at

    def _check_record(
        self, request: usage_service_pb2.RecordUsageRequest, prefix: str, book: PriceBook,
        agentless: bool = False,
    ) -> UsageRecord:  # fmt: skip
        no_agent = agentless and not request.agent_id
        if prefix and not agentless:  # a batch's record (a lone RecordUsage was checked by
            require_fields(request, prefix)  # the chassis; a span's was built complete)
        usage_id = require_client_id(prefix + "usage_id", request.usage_id)
        thread_id = require_id(prefix + "thread_id", request.thread_id) if request.thread_id else ""
        agent_id = "" if no_agent else require_id(prefix + "agent_id", request.agent_id)
        project_id = (
            require_id(prefix + "project_id", request.project_id) if request.project_id else ""
        )
        principal = current_principal()
        if principal.role == AGENT and not project_id:
            project_id = principal.project_id  # an agent records in its own project
        model = require_model(prefix + "model", request.model)
        reservation_id = (
            require_client_id(prefix + "reservation_id", request.reservation_id)
            if request.reservation_id
            else ""
        )
        _check_counts(request, prefix)
        cost, unpriced = _cost(request, prefix, model, book)
        call = _checked_call(request, prefix, agent_id, project_id, cost)
        body = request.SerializeToString(deterministic=True)
        return UsageRecord(
            key_id=principal.key_id,
            usage_id=usage_id,
            thread_id=thread_id,
            agent_id=agent_id,
            project_id=project_id,
            model=model,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            cached_prompt_tokens=request.cached_prompt_tokens,
            reasoning_tokens=request.reasoning_tokens,
            cache_write_tokens=request.cache_write_tokens,
            estimated=request.estimated,
            cost_micros=cost,
            latency_ms=request.latency_ms,
            unpriced=unpriced,
            reservation_id=reservation_id,
            fingerprint=hashlib.blake2b(body, digest_size=12).hexdigest(),
            call=call,
            response_id=request.call.response_id if call else "",
        )

    async def _may_record(self, record: UsageRecord, prefix: str) -> None:
        """The superuser records anything; an agent only its own usage in its project; an
        owner only in projects it owns."""
        principal = current_principal()
        if principal.is_superuser:
            return
        if principal.role == AGENT:
            require_self(record.agent_id, prefix + "agent_id")
            if record.project_id != principal.project_id:
                raise errors.permission_denied(
                    f"an agent token records usage only in its project ({principal.project_id})",
                    "NOT_SELF",
                )
            return
        if not record.project_id:
            raise errors.invalid_argument(prefix + "project_id", "is required for owner tokens")
        if not await self._agents.can_see_project(record.project_id):
            raise errors.not_found("project", record.project_id)
        if record.agent_id:  # (none: an owner's span that named no agent)
            await self._require_agent_in(record.agent_id, record.project_id, prefix)

    async def _require_agent_in(self, agent_id: str, project_id: str, prefix: str = "") -> None:
        """An owner's write names only agents of the project it writes in (the thread's
        project is checked by the store: a thread of another project is FOREIGN)."""
        if await self._agents.project_of_agent(agent_id) != project_id:
            raise errors.invalid_argument(
                prefix + "agent_id", f"no agent {agent_id!r} in project {project_id!r}"
            )

    async def _thread_access(self, thread_id: str) -> str:
        """A thread's budget is visible to whoever may see its project (returned)."""
        if current_principal().is_superuser:
            return ""
        exists, project_id = await self._store.budget_project(thread_id)
        if not exists or not project_id or not await self._agents.can_see_project(project_id):
            raise _no_budget(thread_id)
        return project_id

    def _record_answer(
        self, record: UsageRecord, outcome: RecordOutcome
    ) -> usage_service_pb2.RecordUsageResponse:
        _refuse_outcome(record, outcome)
        if outcome.outcome == Outcome.NEW:
            _count_recorded([(record, outcome.cost_micros)])
        return _answer(outcome)

    # Budgets and reservations -------------------------------------------------------

    async def ReserveBudget(
        self, request: usage_service_pb2.ReserveBudgetRequest, context: ServicerContext
    ) -> usage_pb2.Reservation:
        hold = await self._check_hold(request)
        held = await self._store.reserve(hold)
        if held.outcome == Outcome.NO_BUDGET:  # (a thread named, without a budget)
            raise _no_budget(hold.thread_id)
        if held.outcome == Outcome.CLOSED:
            raise errors.failed_precondition(
                f"thread {hold.thread_id!r} is closed: no new reservations",
                "THREAD_CLOSED",
                thread_id=hold.thread_id,
            )
        if held.outcome == Outcome.CONFLICT:
            raise errors.already_exists(
                "reservation", hold.reservation_id,
                f"reservation {hold.reservation_id!r} already holds a different number of tokens",
            )  # fmt: skip
        if held.outcome == Outcome.EXHAUSTED:
            raise _refused(hold, held.refused, budget_message(held.state))
        return usage_pb2.Reservation(
            reservation_id=hold.reservation_id,
            thread_id=hold.thread_id,
            tokens=held.tokens,
            expire_time=timestamp(held.expire_ms),
            budget=budget_message(held.state),
        )

    async def _check_hold(self, request: usage_service_pb2.ReserveBudgetRequest) -> Hold:
        reservation_id = require_client_id("reservation_id", request.reservation_id)
        thread_id = require_id("thread_id", request.thread_id) if request.thread_id else ""
        agent_id = require_id("agent_id", request.agent_id) if request.agent_id else ""
        model = require_model("model", request.model) if request.model else ""
        if thread_id:
            project_id = await self._thread_access(thread_id)
        else:
            project_id = await self._threadless_project(request.project_id)
        if not 0 < request.tokens <= MAX_TOKENS_PER_CALL:
            raise errors.invalid_argument("tokens", f"must be between 1 and {MAX_TOKENS_PER_CALL}")
        ttl_ms = _ttl_ms(request)
        if not 0 <= request.min_tokens <= request.tokens:
            raise errors.invalid_argument("min_tokens", "must be between 0 and tokens")
        principal = current_principal()
        if principal.role == AGENT:  # an agent reserves as itself: its budgets cover the call
            agent_id = agent_id or principal.subject
            require_self(agent_id, "agent_id")
        elif agent_id and project_id:  # an owner: the agent must be the thread's project's
            await self._require_agent_in(agent_id, project_id)
        return Hold(
            reservation_id=reservation_id,
            thread_id=thread_id,
            tokens=request.tokens,
            cost_micros=(await self._prices.book()).estimate_micros(
                model, request.tokens, now_ms()
            ),
            ttl_ms=ttl_ms,
            agent_id=agent_id,
            model=model,
            key_id=principal.key_id,
            project_id="" if thread_id else project_id,
            charge_on_expiry=request.on_expiry == usage_service_pb2.EXPIRY_ACTION_CHARGE,
            least_tokens=request.min_tokens,
        )

    async def _threadless_project(self, given: str) -> str:
        """The project of a reservation without a thread: an agent token's own; else the
        one named, which the caller must be able to see."""
        principal = current_principal()
        if principal.role == AGENT:
            if given and given != principal.project_id:
                raise errors.permission_denied(
                    f"an agent token reserves only in its project ({principal.project_id})",
                    "NOT_SELF",
                )
            return principal.project_id
        if not given:
            raise errors.invalid_argument(
                "project_id", "is required for a reservation without a thread_id"
            )
        project_id = require_id("project_id", given)
        if not principal.is_superuser and not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        return project_id

    async def ReleaseReservation(
        self,
        request: usage_service_pb2.ReleaseReservationRequest,
        context: ServicerContext,
    ) -> usage_service_pb2.ReleaseReservationResponse:
        reservation_id = require_id("reservation_id", request.reservation_id)
        if request.thread_id:
            thread_id = require_id("thread_id", request.thread_id)
            await self._thread_access(thread_id)
            project_id = ""
        else:
            thread_id, project_id = "", await self._threadless_project(request.project_id)
        change = await self._store.release(thread_id, reservation_id, project_id)
        if change.outcome == Outcome.NO_BUDGET:
            raise _no_budget(thread_id)
        return usage_service_pb2.ReleaseReservationResponse(
            released=change.released, budget=budget_message(change.state)
        )

    async def SetThreadBudget(
        self, request: usage_service_pb2.SetThreadBudgetRequest, context: ServicerContext
    ) -> usage_pb2.ThreadBudget:
        principal = require_manager()
        thread_id = require_id("thread_id", request.thread_id)
        project_id = require_id("project_id", request.project_id) if request.project_id else ""
        if not principal.is_superuser:
            if not project_id:
                raise errors.invalid_argument("project_id", "is required for owner tokens")
            if not await self._agents.can_see_project(project_id):
                raise errors.not_found("project", project_id)
        if not 0 <= request.max_tokens <= MAX_BUDGET:
            raise errors.invalid_argument(
                "max_tokens", f"must be between 0 (default) and {MAX_BUDGET}"
            )
        max_tokens = request.max_tokens or self._default_max_tokens
        # A budget is created only for a thread being created (the thread service's call)
        # or by the superuser; anyone else changes an existing one, so nobody can take a
        # thread id by budgeting a thread that does not exist.
        create = principal.is_superuser or current_call_is_internal()
        if create and not project_id and (await self._store.thread_project(thread_id)) is None:
            raise errors.invalid_argument(
                "project_id", "is required to create a budget: a thread budget belongs to a project"
            )
        state = await self._store.set_budget(thread_id, max_tokens, project_id, create)
        if state is None:  # none to change, or the thread belongs to another project
            raise _no_budget(thread_id)
        return budget_message(state)

    async def CloseThreadBudget(
        self, request: usage_service_pb2.CloseThreadBudgetRequest, context: ServicerContext
    ) -> usage_pb2.ThreadBudget:
        require_manager()
        thread_id = require_id("thread_id", request.thread_id)
        await self._thread_access(thread_id)
        change = await self._store.close_budget(thread_id)
        if change.outcome == Outcome.NO_BUDGET:
            raise _no_budget(thread_id)
        return budget_message(change.state)

    async def GetThreadBudget(
        self, request: usage_service_pb2.GetThreadBudgetRequest, context: ServicerContext
    ) -> usage_pb2.ThreadBudget:
        thread_id = require_id("thread_id", request.thread_id)
        await self._thread_access(thread_id)
        (state,) = await self._store.budgets([thread_id])
        if state is None:
            raise _no_budget(thread_id)
        return budget_message(state)

    async def BatchGetThreadBudgets(
        self, request: usage_service_pb2.BatchGetThreadBudgetsRequest, context: ServicerContext
    ) -> usage_service_pb2.BatchGetThreadBudgetsResponse:
        if len(request.thread_ids) > MAX_PAGE_SIZE:
            raise errors.invalid_argument("thread_ids", f"names more than {MAX_PAGE_SIZE} threads")
        ids = [require_id(f"thread_ids[{i}]", t) for i, t in enumerate(request.thread_ids)]
        states = await self._visible_budgets(ids)
        return usage_service_pb2.BatchGetThreadBudgetsResponse(
            budgets=[
                budget_message(s) if s is not None else usage_pb2.ThreadBudget(thread_id=t)
                for t, s in zip(ids, states, strict=True)
            ]
        )

    async def _visible_budgets(self, ids: list[str]) -> list[BudgetState | None]:
        """As BatchGetAgentUsage: the superuser and a peer enriching a page it filtered see
        every budget; anyone else the budgets of the projects they may see."""
        states = await self._store.budgets(ids)
        if current_principal().is_superuser or current_call_is_internal():
            return states
        projects = [await self._store.thread_project(t) for t in ids]
        seen = {p for p in set(projects) if p and await self._agents.can_see_project(p)}
        return [s if p in seen else None for s, p in zip(states, projects, strict=True)]

    async def ListThreadBudgets(
        self, request: usage_service_pb2.ListThreadBudgetsRequest, context: ServicerContext
    ) -> usage_service_pb2.ListThreadBudgetsResponse:
        require_superuser("listing every thread's budget")
        page = parse_page(request.page_size, request.page_token, request.skip, ("budgets",))
        states, token, total = await self._store.hottest_budgets(page)
        return usage_service_pb2.ListThreadBudgetsResponse(
            threads=[budget_message(s) for s in states],
            next_page_token=token,
            total_size=total,
            default_max_tokens=self._default_max_tokens,
        )

    # Reads --------------------------------------------------------------------------

    async def GetUsageOverview(
        self, request: usage_service_pb2.GetUsageOverviewRequest, context: ServicerContext
    ) -> usage_pb2.UsageOverview:
        project_id = require_id("project_id", request.project_id) if request.project_id else ""
        if not project_id:
            require_superuser("the cluster-wide usage overview")
        elif not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        overview = await self._store.overview(project_id, tuning.TOP_N)
        return usage_pb2.UsageOverview(
            totals=totals_message(overview.totals),
            by_agent=[
                usage_pb2.AgentUsage(agent_id=a, totals=totals_message(c))
                for a, c in overview.by_agent
            ],
            by_model=[
                usage_pb2.ModelUsage(model=m, totals=totals_message(c))
                for m, c in overview.by_model
            ],
            active_threads=overview.active_threads,
        )

    async def GetAgentUsage(
        self, request: usage_service_pb2.GetAgentUsageRequest, context: ServicerContext
    ) -> usage_pb2.AgentUsage:
        agent_id = require_id("agent_id", request.agent_id)
        trusted = current_principal().is_superuser or current_call_is_internal()
        if not trusted and await self._agents.find_agent(agent_id) is None:
            # Another project's agent reads as an unknown one: zeros.
            return usage_pb2.AgentUsage(agent_id=agent_id, totals=totals_message(Counters()))
        counters = await self._store.agent_counters(agent_id)
        return usage_pb2.AgentUsage(agent_id=agent_id, totals=totals_message(counters))

    async def BatchGetAgentUsage(
        self, request: usage_service_pb2.BatchGetAgentUsageRequest, context: ServicerContext
    ) -> usage_service_pb2.BatchGetAgentUsageResponse:
        if len(request.agent_ids) > MAX_PAGE_SIZE:
            raise errors.invalid_argument("agent_ids", f"names more than {MAX_PAGE_SIZE} agents")
        ids = [require_id(f"agent_ids[{i}]", a) for i, a in enumerate(request.agent_ids)]
        # The superuser sees all; a call another service makes on its caller's behalf was
        # judged there (the agent service enriching a page it already filtered): trusted,
        # so no call goes back to the agent service. Anyone else sees their own agents.
        if current_principal().is_superuser or current_call_is_internal():
            visible = set(ids)
        else:
            projects = await asyncio.gather(*(self._agents.project_of_agent(a) for a in ids))
            visible = {a for a, p in zip(ids, projects, strict=True) if p is not None}
        shown = [a for a in ids if a in visible]
        counters = dict(zip(shown, await self._store.agents_counters(shown), strict=True))
        return usage_service_pb2.BatchGetAgentUsageResponse(
            usages=[
                usage_pb2.AgentUsage(agent_id=a, totals=totals_message(counters.get(a, Counters())))
                for a in ids
            ]
        )

    async def GetModelUsage(
        self, request: usage_service_pb2.GetModelUsageRequest, context: ServicerContext
    ) -> usage_pb2.ModelUsage:
        require_superuser("cluster-wide model usage")
        model = require_model("model", request.model)
        counters = await self._store.model_counters(model)
        return usage_pb2.ModelUsage(model=model, totals=totals_message(counters))

    async def ResetUsage(
        self, request: usage_service_pb2.ResetUsageRequest, context: ServicerContext
    ) -> usage_service_pb2.ResetUsageResponse:
        require_superuser("resetting usage")
        return usage_service_pb2.ResetUsageResponse(deleted_keys=await self._store.reset())


def budget_message(state: BudgetState) -> usage_pb2.ThreadBudget:
    total = state.prompt_tokens + state.completion_tokens
    remaining = max(0, state.max_tokens - total - state.reserved_tokens)
    percent = round(100 * total / state.max_tokens, 1) if state.max_tokens else 0.0
    return usage_pb2.ThreadBudget(
        thread_id=state.thread_id,
        max_tokens=state.max_tokens,
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        total_tokens=total,
        reserved_tokens=state.reserved_tokens,
        remaining=remaining,
        percent_used=percent,
        is_exhausted=remaining == 0,
        is_closed=state.closed,
        update_time=timestamp(state.update_ms),
    )


def _ttl_ms(request: usage_service_pb2.ReserveBudgetRequest) -> int:
    if not request.HasField("ttl"):
        return DEFAULT_RESERVATION_TTL_MS
    ttl_ms = request.ttl.ToMilliseconds()
    if not 0 < ttl_ms <= MAX_RESERVATION_TTL_MS:
        raise errors.invalid_argument("ttl", "must be more than 0 and at most 1 hour")
    return ttl_ms


def _refuse_outcome(record: UsageRecord, outcome: RecordOutcome) -> None:
    """The error of a record the store would not write (another project's thread, or the
    same usage id with another body)."""
    if outcome.outcome == Outcome.FOREIGN:
        raise errors.not_found("thread_budget", record.thread_id)
    if outcome.outcome == Outcome.CONFLICT:
        raise errors.already_exists(
            "usage", record.usage_id,
            f"usage_id {record.usage_id!r} was already recorded with a different body",
        )  # fmt: skip


def _answer(outcome: RecordOutcome) -> usage_service_pb2.RecordUsageResponse:
    return usage_service_pb2.RecordUsageResponse(
        cost_usd=outcome.cost_micros / 1_000_000,
        cost_micros=outcome.cost_micros,
        duplicate=outcome.outcome == Outcome.DUPLICATE,
        budget=None if outcome.budget is None else budget_message(outcome.budget),
    )


def _count_recorded(new: Sequence[tuple[UsageRecord, int]]) -> None:
    """The recorded-usage metrics, once per call however many records (with their costs)
    it wrote."""
    if new:
        PROMPT_TOKENS.inc(sum(r.prompt_tokens for r, _ in new))
        COMPLETION_TOKENS.inc(sum(r.completion_tokens for r, _ in new))
        COST_RECORDED.inc(sum(cost for _, cost in new))


def _check_counts(request: usage_service_pb2.RecordUsageRequest, prefix: str) -> None:
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(request, name)
        if not 0 <= value <= MAX_TOKENS_PER_CALL:
            raise errors.invalid_argument(
                prefix + name, f"must be between 0 and {MAX_TOKENS_PER_CALL}"
            )
    for part, whole in (("cached_prompt_tokens", "prompt_tokens"),
                        ("reasoning_tokens", "completion_tokens")):  # fmt: skip
        if not 0 <= getattr(request, part) <= getattr(request, whole):
            raise errors.invalid_argument(prefix + part, f"must be between 0 and {whole}")
    cache_read, cache_write = request.cached_prompt_tokens, request.cache_write_tokens
    if not 0 <= cache_write <= request.prompt_tokens - cache_read:
        raise errors.invalid_argument(
            prefix + "cache_write_tokens",
            "must be between 0 and prompt_tokens less cached_prompt_tokens (both are parts "
            "of prompt_tokens)",
        )
    if not 0 <= request.latency_ms <= MAX_LATENCY_MS:
        raise errors.invalid_argument(
            prefix + "latency_ms", f"must be between 0 and {MAX_LATENCY_MS}"
        )


def _cost(
    request: usage_service_pb2.RecordUsageRequest, prefix: str, model: str, book: PriceBook
) -> tuple[int, bool]:
    """(cost in micro-USD, whether the model had no price): the given cost, else the price
    in force now."""
    if request.HasField("cost_usd"):
        if not (math.isfinite(request.cost_usd) and 0 <= request.cost_usd <= MAX_COST_USD):
            raise errors.invalid_argument(
                prefix + "cost_usd", f"must be between 0 and {MAX_COST_USD:g}"
            )
        return round(request.cost_usd * 1_000_000), False
    priced = book.cost_micros(
        model, request.prompt_tokens, request.completion_tokens, request.cached_prompt_tokens,
        now_ms(), cache_write=request.cache_write_tokens,
    )  # fmt: skip
    return (0, True) if priced is None else (priced, False)


def _no_budget(thread_id: str) -> errors.ServiceError:
    return errors.not_found("thread_budget", thread_id)


def _refused(
    hold: Hold, refused: list[Refusal], thread: usage_pb2.ThreadBudget
) -> errors.ServiceError:
    """RESOURCE_EXHAUSTED naming, in its QuotaFailure, every budget that refused; with a
    RetryInfo saying when room frees only when every refusal was a window or
    max_in_flight that waiting helps (a thread or calendar budget: waiting does not)."""
    violations = []
    for r in refused:
        BUDGET_REJECTIONS.labels(reason=r.kind).inc()
        violations.append((r.subject, _refusal_text(r, hold, thread)))
    only_thread = [r.kind for r in refused] == ["thread"]
    waits = [r.wait_ms for r in refused]
    return errors.resource_exhausted(
        "; ".join(text for _, text in violations),
        "THREAD_BUDGET_EXHAUSTED" if only_thread else "BUDGET_EXHAUSTED",
        violations=violations,
        retry_after_s=None if min(waits) < 0 else max(waits) / 1000,
    )


def _refusal_text(r: Refusal, hold: Hold, thread: usage_pb2.ThreadBudget) -> str:
    budget = f"budget {r.subject.removeprefix('budget:')!r}"
    if r.kind == "thread":
        return (
            f"thread {hold.thread_id!r} budget exhausted: requested {hold.tokens} tokens, "
            f"{thread.remaining} of {thread.max_tokens} remain"
        )
    if r.kind == "inflight":
        return f"{budget} has its max_in_flight reservations open; retry in 1 s"
    if r.kind == "window" and r.wait_ms >= 0:
        return (
            f"{budget}: its window has no room for {hold.tokens} tokens and a request; "
            f"room in {r.wait_ms / 1000:.3f} s"
        )
    if r.kind == "window":
        return f"{budget}: {hold.tokens} tokens are more than its window allows"
    return f"{budget} has no room for {hold.tokens} tokens"


def _checked_call(
    request: usage_service_pb2.RecordUsageRequest,
    prefix: str,
    agent_id: str,
    project_id: str,
    cost_micros: int,
) -> str:
    """The call-log entry a record carries ('' for none): the record's own call, in its
    project, of its agent; its usage is the record's, priced."""
    if not request.HasField("call"):
        return ""
    require_call(request.call, prefix + "call")
    if request.call.agent_id != agent_id or (project_id and request.call.project_id != project_id):
        raise errors.invalid_argument(
            prefix + "call", "must name the record's agent_id and project_id"
        )
    call = usage_pb2.ModelCall()
    call.CopyFrom(request.call)
    call.usage_id, call.estimated = request.usage_id, request.estimated
    call.usage.CopyFrom(usage_pb2.UsageTotals(
        total_tokens=request.prompt_tokens + request.completion_tokens,
        prompt_tokens=request.prompt_tokens, completion_tokens=request.completion_tokens,
        request_count=1, total_cost_micros=cost_micros, total_cost_usd=cost_micros / 1e6,
        cached_prompt_tokens=request.cached_prompt_tokens,
        reasoning_tokens=request.reasoning_tokens,
        cache_write_tokens=request.cache_write_tokens,
        estimated_request_count=int(request.estimated),
    ))  # fmt: skip
    return call_member(call)
