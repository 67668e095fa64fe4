"""The budget, alert and webhook RPCs of the UsageService (docs/api.md §8).

Owners manage their projects' budgets and webhooks; an agent token may read its own
agent budgets; the superuser everything. Anything the caller may not see is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping

from grpc.aio import ServicerContext

from agentplane.usage.v1 import usage_pb2, usage_service_pb2
from services.common import enums, errors, tuning
from services.common.access import require_manager
from services.common.auth import AGENT
from services.common.context import current_principal
from services.common.convert import (
    new_id,
    now_ms,
    require_client_id,
    require_id,
    require_model,
    require_text,
    timestamp,
)
from services.common.interceptors import stream_open
from services.common.limits import (
    MAX_BUDGET_COST_MICROS,
    MAX_BUDGET_REQUESTS,
    MAX_BUDGET_TOKENS,
    MAX_EVENT_TYPE_LENGTH,
    MAX_IN_FLIGHT,
    MAX_THRESHOLDS,
    MAX_TIME_ZONE_LENGTH,
    MAX_TITLE_LENGTH,
    MAX_URL_LENGTH,
)
from services.common.pagination import parse_page
from services.common.peers import AgentClient
from services.common.redis import RedisClient
from services.common.settings import Settings
from services.usage_svc.budget_store import (
    EVENT_TYPES,
    MAX_BUDGETS_PER_SCOPE_ID,
    Alert,
    BudgetRecord,
    BudgetSpec,
    BudgetStorage,
    DeliveryRecord,
    Page,
    PeriodUsage,
    WebhookRecord,
)
from services.usage_svc.periods import Period, zone
from services.usage_svc.webhooks import UnsafeUrl, check_url

DEFAULT_THRESHOLDS = (50, 80, 100)
MUTABLE = {"limit_tokens", "limit_cost_micros", "limit_requests", "max_in_flight", "enforcement",
           "alert_thresholds", "display_name"}  # fmt: skip
DEFAULT_SECRET_GRACE_MS = 24 * 3_600_000
MAX_SECRET_GRACE_MS = 7 * 24 * 3_600_000


class BudgetRpcs:
    """Budget, alert and webhook handlers; mixed into the UsageServicer."""

    _budgets: BudgetStorage
    _agents: AgentClient
    _streams: RedisClient
    _stopping: asyncio.Event
    _settings: Settings

    # Access -------------------------------------------------------------------------

    async def _managed_project(self, project_id: str) -> str:
        """A project the caller manages (owner or superuser); NOT_FOUND otherwise."""
        require_manager()
        project_id = require_id("project_id", project_id)
        await self._agents.require_project(project_id)
        return project_id

    async def _managed_ref(self, project_id: str, kind: str, resource_id: str) -> tuple[str, str]:
        """(project, id) of a budget or webhook named in a manager's request."""
        return await self._managed_project(project_id), require_id(f"{kind}_id", resource_id)

    async def _visible_project(self, project_id: str) -> str:
        project_id = require_id("project_id", project_id)
        if not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        return project_id

    async def _readable_budget(self, project_id: str, budget_id: str) -> BudgetRecord:
        project_id = await self._visible_project(project_id)
        budget_id = require_id("budget_id", budget_id)
        found = await self._budgets.get(project_id, budget_id)
        principal = current_principal()
        if found is None or (principal.role == AGENT and not _own_agent_budget(found)):
            raise errors.not_found("budget", budget_id)
        return found

    async def _managed_budget(self, project_id: str, budget_id: str) -> BudgetRecord:
        project_id = await self._managed_project(project_id)
        budget_id = require_id("budget_id", budget_id)
        found = await self._budgets.get(project_id, budget_id)
        if found is None:
            raise errors.not_found("budget", budget_id)
        return found

    # Budgets ------------------------------------------------------------------------

    async def CreateBudget(
        self, request: usage_service_pb2.CreateBudgetRequest, context: ServicerContext
    ) -> usage_pb2.Budget:
        project_id = await self._managed_project(request.project_id)
        spec = await self._check_spec(project_id, request.budget)
        budget_id = new_id()
        answer = await self._budgets.create(project_id, budget_id, spec)
        if answer == "FULL":
            raise errors.failed_precondition(
                f"project {project_id!r} has the most budgets a project may have",
                "TOO_MANY_BUDGETS",
            )
        if answer == "CROWDED":
            scope_id = spec.scope_id or project_id  # a project budget's scope is its project
            raise errors.failed_precondition(
                f"{spec.scope.lower()} {scope_id!r} has the most budgets one scope may have "
                f"({MAX_BUDGETS_PER_SCOPE_ID})",
                "TOO_MANY_BUDGETS",
            )
        return budget_message(await self._managed_budget(project_id, budget_id))

    async def GetBudget(
        self, request: usage_service_pb2.GetBudgetRequest, context: ServicerContext
    ) -> usage_pb2.Budget:
        return budget_message(await self._readable_budget(request.project_id, request.budget_id))

    async def ListBudgets(
        self, request: usage_service_pb2.ListBudgetsRequest, context: ServicerContext
    ) -> usage_service_pb2.ListBudgetsResponse:
        project_id = await self._visible_project(request.project_id)
        scope = _scope(request.scope, "scope")
        scope_id = request.scope_id
        if scope_id and not scope:
            raise errors.invalid_argument("scope", "is required with scope_id")
        principal = current_principal()
        if principal.role == AGENT:  # an agent sees its own agent budgets only
            if (scope and scope != "AGENT") or (scope_id and scope_id != principal.subject):
                return usage_service_pb2.ListBudgetsResponse()
            scope, scope_id = "AGENT", principal.subject
        page = parse_page(
            request.page_size, request.page_token, 0, ("budgets", project_id, scope, scope_id)
        )
        found = await self._budgets.list_budgets(
            project_id, scope, scope_id, _offset(page.cursor), page.size
        )
        return usage_service_pb2.ListBudgetsResponse(
            budgets=[budget_message(b) for b in found.items],
            next_page_token=_next_token(page, found),
            total_size=found.total,
        )

    async def UpdateBudget(
        self, request: usage_service_pb2.UpdateBudgetRequest, context: ServicerContext
    ) -> usage_pb2.Budget:
        current = await self._managed_budget(request.project_id, request.budget_id)
        changes = _budget_changes(current.spec, request.budget, list(request.update_mask.paths))
        if changes and not await self._budgets.update(
            current.project_id, current.budget_id, changes
        ):
            raise errors.not_found("budget", current.budget_id)
        return budget_message(await self._managed_budget(current.project_id, current.budget_id))

    async def DeleteBudget(
        self, request: usage_service_pb2.DeleteBudgetRequest, context: ServicerContext
    ) -> usage_service_pb2.DeleteBudgetResponse:
        project_id, budget_id = await self._managed_ref(
            request.project_id, "budget", request.budget_id
        )
        if not await self._budgets.delete(project_id, budget_id):
            raise errors.not_found("budget", budget_id)
        return usage_service_pb2.DeleteBudgetResponse()

    async def ResetBudget(
        self, request: usage_service_pb2.ResetBudgetRequest, context: ServicerContext
    ) -> usage_pb2.Budget:
        project_id, budget_id = await self._managed_ref(
            request.project_id, "budget", request.budget_id
        )
        if not await self._budgets.reset(project_id, budget_id, current_principal().label):
            raise errors.not_found("budget", budget_id)
        return budget_message(await self._managed_budget(project_id, budget_id))

    async def ListBudgetPeriods(
        self, request: usage_service_pb2.ListBudgetPeriodsRequest, context: ServicerContext
    ) -> usage_service_pb2.ListBudgetPeriodsResponse:
        budget = await self._readable_budget(request.project_id, request.budget_id)
        page = parse_page(
            request.page_size,
            request.page_token,
            0,
            ("periods", budget.project_id, budget.budget_id),
        )
        found = await self._budgets.periods(
            budget.project_id, budget.budget_id, _offset(page.cursor), page.size
        )
        return usage_service_pb2.ListBudgetPeriodsResponse(
            periods=[period_message(p) for p in found.items],
            next_page_token=_next_token(page, found),
        )

    async def _check_spec(self, project_id: str, budget: usage_pb2.Budget) -> BudgetSpec:
        scope = _scope(budget.scope, "budget.scope")
        scope_id = _scope_id(scope, budget.scope_id)
        if scope == "AGENT":
            agent = await self._agents.find_agent(scope_id)
            if agent is None or agent.project_id != project_id:
                raise errors.not_found("agent", scope_id)
        limits = _limits(budget, LIMIT_FIELDS)
        time_zone = budget.time_zone or "UTC"
        require_text("budget.time_zone", time_zone, MAX_TIME_ZONE_LENGTH)
        if zone(time_zone) is None:
            raise errors.invalid_argument(
                "budget.time_zone", f"unknown IANA time zone {time_zone!r}"
            )
        return BudgetSpec(
            scope=scope,
            scope_id=scope_id,
            limit_tokens=limits["limit_tokens"],
            limit_cost_micros=limits["limit_cost_micros"],
            limit_requests=limits["limit_requests"],
            max_in_flight=limits["max_in_flight"],
            period=Period(enums.short_name(usage_pb2.BudgetPeriod, budget.period)),
            time_zone=time_zone,
            enforcement=_enforcement(budget.enforcement),
            thresholds=_thresholds(budget.alert_thresholds)
            if budget.alert_thresholds
            else DEFAULT_THRESHOLDS,
            display_name=require_text("budget.display_name", budget.display_name, MAX_TITLE_LENGTH),
        )

    # Alerts -------------------------------------------------------------------------

    async def WatchBudgetAlerts(
        self, request: usage_service_pb2.WatchBudgetAlertsRequest, context: ServicerContext
    ) -> AsyncIterator[usage_pb2.BudgetAlert]:
        project_id = await self._managed_project(request.project_id)
        if request.after_alert_id:
            after_id = require_id("after_alert_id", request.after_alert_id)
            # An alert older than the 7 days kept (or unknown): everything kept is sent.
            after = await self._budgets.alert_entry(project_id, after_id) or "0-0"
        else:
            after = await self._budgets.last_alert_entry(project_id)
        stream = await stream_open(context, self._stopping)
        while stream.active:
            for alert in await self._budgets.read_alerts(
                self._streams, project_id, after, tuning.STREAM_BLOCK_MS
            ):
                after = alert.entry_id
                yield alert_message(alert)

    # Webhooks -----------------------------------------------------------------------

    async def CreateWebhook(
        self, request: usage_service_pb2.CreateWebhookRequest, context: ServicerContext
    ) -> usage_service_pb2.CreateWebhookResponse:
        project_id = await self._managed_project(request.project_id)
        url = require_text("url", request.url, MAX_URL_LENGTH)
        try:
            await check_url(
                url,
                self._settings.webhook_allow_http,
                self._settings.webhook_allow_private_networks,
            )
        except UnsafeUrl as exc:
            raise errors.invalid_argument("url", str(exc)) from None
        for position, kind in enumerate(request.event_types):
            require_text(f"event_types[{position}]", kind, MAX_EVENT_TYPE_LENGTH)
        types = sorted(set(request.event_types)) or list(EVENT_TYPES)
        for kind in types:
            if kind not in EVENT_TYPES:
                raise errors.invalid_argument(
                    "event_types", f"unknown event type {kind!r} (known: {', '.join(EVENT_TYPES)})"
                )
        webhook = WebhookRecord(new_id(), project_id, url, types, now_ms())
        secret = "whsec_" + secrets.token_urlsafe(32)
        if not await self._budgets.add_webhook(webhook, secret):
            raise errors.failed_precondition(
                f"project {project_id!r} has the most webhooks a project may have",
                "TOO_MANY_WEBHOOKS",
            )
        return usage_service_pb2.CreateWebhookResponse(
            webhook=webhook_message(webhook), secret=secret
        )

    async def RotateWebhookSecret(
        self, request: usage_service_pb2.RotateWebhookSecretRequest, context: ServicerContext
    ) -> usage_service_pb2.RotateWebhookSecretResponse:
        project_id, webhook_id = await self._managed_ref(
            request.project_id, "webhook", request.webhook_id
        )
        grace_ms = DEFAULT_SECRET_GRACE_MS
        if request.HasField("grace_period"):
            grace_ms = request.grace_period.ToMilliseconds()
            if not 0 <= grace_ms <= MAX_SECRET_GRACE_MS:
                raise errors.invalid_argument("grace_period", "must be from 0 to 7 days")
        until = now_ms() + grace_ms if grace_ms else 0
        secret = "whsec_" + secrets.token_urlsafe(32)
        if not await self._budgets.rotate_secret(project_id, webhook_id, secret, until):
            raise errors.not_found("webhook", webhook_id)
        found = [w for w in await self._budgets.webhooks(project_id) if w.webhook_id == webhook_id]
        if not found:  # deleted meanwhile
            raise errors.not_found("webhook", webhook_id)
        return usage_service_pb2.RotateWebhookSecretResponse(
            webhook=webhook_message(found[0]), secret=secret,
            previous_secret_expire_time=timestamp(until),
        )  # fmt: skip

    async def ListWebhooks(
        self, request: usage_service_pb2.ListWebhooksRequest, context: ServicerContext
    ) -> usage_service_pb2.ListWebhooksResponse:
        project_id = await self._managed_project(request.project_id)
        return usage_service_pb2.ListWebhooksResponse(
            webhooks=[webhook_message(w) for w in await self._budgets.webhooks(project_id)]
        )

    async def DeleteWebhook(
        self, request: usage_service_pb2.DeleteWebhookRequest, context: ServicerContext
    ) -> usage_service_pb2.DeleteWebhookResponse:
        project_id, webhook_id = await self._managed_ref(
            request.project_id, "webhook", request.webhook_id
        )
        if not await self._budgets.delete_webhook(project_id, webhook_id):
            raise errors.not_found("webhook", webhook_id)
        return usage_service_pb2.DeleteWebhookResponse()

    async def ListWebhookDeliveries(
        self, request: usage_service_pb2.ListWebhookDeliveriesRequest, context: ServicerContext
    ) -> usage_service_pb2.ListWebhookDeliveriesResponse:
        project_id, webhook_id = await self._managed_ref(
            request.project_id, "webhook", request.webhook_id
        )
        if not await self._budgets.has_webhook(project_id, webhook_id):
            raise errors.not_found("webhook", webhook_id)
        page = parse_page(
            request.page_size, request.page_token, 0, ("deliveries", project_id, webhook_id)
        )
        found = await self._budgets.deliveries(
            project_id, webhook_id, _offset(page.cursor), page.size
        )
        return usage_service_pb2.ListWebhookDeliveriesResponse(
            deliveries=[delivery_message(d) for d in found.items],
            next_page_token=_next_token(page, found),
        )


# Checks ---------------------------------------------------------------------------


def _own_agent_budget(budget: BudgetRecord) -> bool:
    principal = current_principal()
    return budget.spec.scope == "AGENT" and budget.spec.scope_id == principal.subject


def _scope(value: int, field: str) -> str:
    """The scope's name ("" when unset; the contract marks where a scope must be set)."""
    if value == usage_pb2.BUDGET_SCOPE_UNSPECIFIED:
        return ""
    if value not in usage_pb2.BudgetScope.values():
        raise errors.invalid_argument(field, "is not a known scope")
    return enums.short_name(usage_pb2.BudgetScope, value)


def _enforcement(value: int) -> str:
    if value == usage_pb2.BUDGET_ENFORCEMENT_UNSPECIFIED:
        return "HARD"
    return enums.short_name(usage_pb2.BudgetEnforcement, value)


def _limit(field: str, value: int, most: int) -> int:
    if not 0 <= value <= most:
        raise errors.invalid_argument(field, f"must be between 0 (no limit) and {most}")
    return value


# The limits a budget may set: (hash field, most) each; at least one is set.
LIMIT_FIELDS = {
    "limit_tokens": ("lt", MAX_BUDGET_TOKENS),
    "limit_cost_micros": ("lc", MAX_BUDGET_COST_MICROS),
    "limit_requests": ("lr", MAX_BUDGET_REQUESTS),
    "max_in_flight": ("mif", MAX_IN_FLIGHT),
}


def _limits(
    budget: usage_pb2.Budget, given: Iterable[str], current: Mapping[str, int] | None = None
) -> dict[str, int]:
    """The budget's limits with the `given` ones taken from `budget`, each checked; at
    least one must be set (a budget with only max_in_flight may have any period)."""
    limits = dict(current or dict.fromkeys(LIMIT_FIELDS, 0))
    for name in given:
        limits[name] = _limit(f"budget.{name}", getattr(budget, name), LIMIT_FIELDS[name][1])
    if not any(limits.values()):
        raise errors.invalid_argument(
            "budget.limit_tokens",
            "at least one of limit_tokens, limit_cost_micros, limit_requests and "
            "max_in_flight is required",
        )
    return limits


def _thresholds(values: object) -> tuple[int, ...]:
    chosen = sorted(set(values))  # type: ignore[call-overload]
    if len(chosen) > MAX_THRESHOLDS:
        raise errors.invalid_argument(
            "budget.alert_thresholds", f"holds more than {MAX_THRESHOLDS} thresholds"
        )
    for value in chosen:
        if not 1 <= value <= 1000:
            raise errors.invalid_argument(
                "budget.alert_thresholds", "each must be a percentage between 1 and 1000"
            )
    return tuple(chosen)


def _offset(cursor: str | None) -> int:
    return int(cursor) if cursor and cursor.isdigit() else 0


def _next_token(page: object, found: Page) -> str:
    return page.token_after(str(found.next_offset)) if found.next_offset else ""  # type: ignore[attr-defined]


# Messages -------------------------------------------------------------------------


def percent_used(tokens: int, cost: int, limit_tokens: int, limit_cost: int) -> float:
    shares = []
    if limit_tokens:
        shares.append(tokens / limit_tokens)
    if limit_cost:
        shares.append(cost / limit_cost)
    return round(100 * max(shares, default=0.0), 1)


def budget_message(b: BudgetRecord, now: int | None = None) -> usage_pb2.Budget:
    """The Budget as callers see it; a window's period is the window ending now."""
    spec = b.spec
    exhausted = (
        (spec.limit_tokens > 0 and b.used_tokens >= spec.limit_tokens)
        or (spec.limit_cost_micros > 0 and b.used_cost_micros >= spec.limit_cost_micros)
        or (spec.limit_requests > 0 and b.used_requests >= spec.limit_requests)
    )
    start, end = b.period_start_ms, b.period_end_ms
    if spec.window_s:
        end = now_ms() if now is None else now
        start = end - spec.window_s * 1000
    message = usage_pb2.Budget(
        budget_id=b.budget_id,
        project_id=b.project_id,
        scope=enums.value_of(usage_pb2.BudgetScope, spec.scope),
        scope_id=spec.scope_id,
        limit_tokens=spec.limit_tokens,
        limit_cost_micros=spec.limit_cost_micros,
        period=enums.value_of(usage_pb2.BudgetPeriod, spec.period.value),
        time_zone=spec.time_zone,
        enforcement=enums.value_of(usage_pb2.BudgetEnforcement, spec.enforcement),
        alert_thresholds=list(spec.thresholds),
        period_start=timestamp(start),
        period_end=timestamp(end),
        used_tokens=b.used_tokens,
        used_cost_micros=b.used_cost_micros,
        reserved_tokens=b.reserved_tokens,
        reserved_cost_micros=b.reserved_cost_micros,
        percent_used=max(
            percent_used(
                b.used_tokens, b.used_cost_micros, spec.limit_tokens, spec.limit_cost_micros
            ),
            percent_used(b.used_requests, 0, spec.limit_requests, 0),
        ),
        limit_requests=spec.limit_requests,
        max_in_flight=spec.max_in_flight,
        used_requests=b.used_requests,
        in_flight=b.in_flight,
        is_exhausted=exhausted,
        create_time=timestamp(b.create_ms),
        update_time=timestamp(b.update_ms),
        reset_time=timestamp(b.reset_ms),
        reset_by=b.reset_by,
        display_name=spec.display_name,
    )
    return message


def period_message(p: PeriodUsage) -> usage_pb2.BudgetPeriodUsage:
    return usage_pb2.BudgetPeriodUsage(
        period_start=timestamp(p.start_ms),
        period_end=timestamp(p.end_ms),
        used_tokens=p.used_tokens,
        used_cost_micros=p.used_cost_micros,
        limit_tokens=p.limit_tokens,
        limit_cost_micros=p.limit_cost_micros,
        percent_used=percent_used(
            p.used_tokens, p.used_cost_micros, p.limit_tokens, p.limit_cost_micros
        ),
    )


def alert_message(a: Alert) -> usage_pb2.BudgetAlert:
    return usage_pb2.BudgetAlert(
        alert_id=a.alert_id,
        budget_id=a.budget_id,
        project_id=a.project_id,
        scope=enums.value_of(usage_pb2.BudgetScope, a.scope),
        scope_id=a.scope_id,
        threshold=a.threshold,
        percent_used=a.percent_used,
        used_tokens=a.used_tokens,
        used_cost_micros=a.used_cost_micros,
        period_start=timestamp(a.period_start_ms),
        create_time=timestamp(a.create_ms),
    )


def webhook_message(w: WebhookRecord) -> usage_pb2.Webhook:
    return usage_pb2.Webhook(
        webhook_id=w.webhook_id,
        project_id=w.project_id,
        url=w.url,
        event_types=w.event_types,
        create_time=timestamp(w.create_ms),
    )


def delivery_message(d: DeliveryRecord) -> usage_pb2.WebhookDelivery:
    message = usage_pb2.WebhookDelivery(
        delivery_id=d.delivery_id,
        webhook_id=d.webhook_id,
        event_id=d.event_id,
        event_type=d.event_type,
        status=enums.value_of(usage_pb2.DeliveryStatus, d.status),
        attempts=d.attempts,
        last_response_code=d.last_code,
        last_error=d.last_error,
        next_attempt_time=timestamp(d.next_ms if d.status == "PENDING" else 0),
        create_time=timestamp(d.create_ms),
        update_time=timestamp(d.update_ms),
    )
    return message


def _budget_changes(spec: BudgetSpec, new: usage_pb2.Budget, paths: list[str]) -> dict[str, str]:
    """The stored fields an UpdateBudget changes, each checked; unknown paths and a budget
    left without any limit are INVALID_ARGUMENT (fixed ones were refused by the chassis:
    IMMUTABLE and OUTPUT_ONLY in the contract)."""
    for path in paths:
        if path not in MUTABLE:
            raise errors.invalid_argument("update_mask", f"unknown field {path!r}")
    current = {name: getattr(spec, name) for name in LIMIT_FIELDS}
    changed = _limits(new, [p for p in LIMIT_FIELDS if p in paths], current)
    changes = {LIMIT_FIELDS[p][0]: str(changed[p]) for p in LIMIT_FIELDS if p in paths}
    if "enforcement" in paths:
        changes["enf"] = _enforcement(new.enforcement)
    if "alert_thresholds" in paths:
        changes["th"] = ",".join(map(str, _thresholds(new.alert_thresholds)))
    if "display_name" in paths:
        changes["name"] = require_text("budget.display_name", new.display_name, MAX_TITLE_LENGTH)
    return changes


def _scope_id(scope: str, scope_id: str) -> str:
    """A budget's scope id as its scope wants it: none for a project, a model name, or an
    id (agent, API key)."""
    if scope == "PROJECT":
        if scope_id:
            raise errors.invalid_argument("budget.scope_id", "must be empty for a project budget")
        return ""
    if scope == "MODEL":
        return require_model("budget.scope_id", scope_id)
    if scope == "THREAD":
        return require_client_id("budget.scope_id", scope_id)
    return require_id("budget.scope_id", scope_id)
