"""Usage over time, its export, and dated model prices (docs/api.md §9); mixed into the
UsageServicer."""

from __future__ import annotations

import asyncio
import bisect
import csv
import io
from collections.abc import AsyncIterator, Sequence

import orjson
from google.api import httpbody_pb2
from grpc.aio import ServicerContext

from agentplane.usage.v1 import usage_pb2, usage_service_pb2
from services.common import codec, errors
from services.common.access import require_superuser
from services.common.convert import now_ms, require_id, require_model, require_text, timestamp
from services.common.interceptors import stream_open
from services.common.limits import MAX_MODEL_LENGTH, MAX_SERIES_BUCKETS
from services.common.pagination import parse_page
from services.common.peers import AgentClient
from services.usage_svc.messages import totals_message
from services.usage_svc.pricing import DatedPrice, Price, PriceStore, TooManyPrices
from services.usage_svc.store import UsageStorage
from services.usage_svc.usage_types import ALL, DAY_MS, HOUR_MS, Counters, SeriesQuery

CSV_COLUMNS = [
    "start_time", "group", "total_tokens", "prompt_tokens", "completion_tokens",
    "cached_prompt_tokens", "reasoning_tokens", "request_count", "total_cost_usd",
    "total_cost_micros", "avg_latency_ms", "unpriced_request_count",
]  # fmt: skip
MAX_PRICE_PER_MILLION = 1_000_000.0
MAX_PRICE_PER_REQUEST = 1_000.0

SeriesRequest = usage_service_pb2.GetUsageTimeSeriesRequest | usage_service_pb2.ExportUsageRequest


class SeriesRpcs:
    _store: UsageStorage
    _agents: AgentClient
    _prices: PriceStore
    _stopping: asyncio.Event

    async def _series_query(self, request: SeriesRequest) -> SeriesQuery:
        project_id = await self._series_project(request.project_id)
        start, end, step = _series_range(request)
        group = {
            usage_pb2.USAGE_GROUP_BY_AGENT: "agent", usage_pb2.USAGE_GROUP_BY_MODEL: "model"
        }.get(request.group_by, "")  # fmt: skip
        agent_id = require_id("agent_id", request.agent_id) if request.agent_id else ""
        model = require_model("model", request.model) if request.model else ""
        # Buckets keep totals per agent and per model, not per pair of them.
        if (agent_id and (model or group == "model")) or (model and group == "agent"):
            raise errors.invalid_argument(
                "model" if model else "agent_id",
                "agent and model cannot be combined (filter or group by one of them)",
            )
        return SeriesQuery(project_id, start, end, step, group, agent_id, model)

    async def _series_project(self, asked: str) -> str:
        """The project asked for, if the caller may see it; "-" (everything) for the
        superuser."""
        if not asked or asked == ALL:
            require_superuser("the whole installation's usage")
            return ALL
        project_id = require_id("project_id", asked)
        if not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        return project_id

    async def GetUsageTimeSeries(
        self, request: usage_service_pb2.GetUsageTimeSeriesRequest, context: ServicerContext
    ) -> usage_service_pb2.GetUsageTimeSeriesResponse:
        series = await self._store.time_series(await self._series_query(request))
        total = Counters()
        buckets = []
        for start, group, counters in series:
            buckets.append(
                usage_pb2.UsageBucket(
                    start_time=timestamp(start), group=group, totals=totals_message(counters)
                )
            )
            _sum_into(total, counters)
        return usage_service_pb2.GetUsageTimeSeriesResponse(
            buckets=buckets, totals=totals_message(total)
        )

    async def ExportUsage(
        self, request: usage_service_pb2.ExportUsageRequest, context: ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        kind = request.format or "csv"
        if kind not in ("csv", "json"):
            raise errors.invalid_argument("format", "must be csv or json")
        query = await self._series_query(request)
        series = await self._store.time_series(query)
        scope = "all" if query.project_id == ALL else query.project_id
        name = f"usage-{scope}-{query.start_ms // 1000}-{query.end_ms // 1000}.{kind}"
        # The gateway turns "x-http-*" initial metadata into the download's HTTP headers.
        await stream_open(
            context,
            self._stopping,
            (("x-http-content-disposition", f'attachment; filename="{name}"'),),
        )
        if kind == "json":
            buckets = [_row(start, group, counters) for start, group, counters in series]
            yield httpbody_pb2.HttpBody(
                content_type="application/json", data=orjson.dumps({"buckets": buckets})
            )
            return
        content_type = "text/csv; charset=utf-8"
        yield httpbody_pb2.HttpBody(content_type=content_type, data=_csv([list(CSV_COLUMNS)]))
        for at in range(0, len(series), 500):  # streamed in chunks of rows
            chunk = series[at : at + 500]
            rows = [list(_row(s, _cell(g), c).values()) for s, g, c in chunk]
            yield httpbody_pb2.HttpBody(content_type=content_type, data=_csv(rows))

    # Prices -------------------------------------------------------------------------

    async def SetModelPrice(
        self, request: usage_service_pb2.SetModelPriceRequest, context: ServicerContext
    ) -> usage_pb2.ModelPrice:
        require_superuser("setting prices")
        given = request.price
        model = require_model("price.model", given.model)
        if "*" in model[:-1]:
            raise errors.invalid_argument("price.model", "a pattern has one '*', at its end")
        values = {
            "prompt_per_million_usd": given.prompt_per_million_usd,
            "completion_per_million_usd": given.completion_per_million_usd,
            "per_request_usd": given.per_request_usd,
        }
        for optional in ("cached_prompt_per_million_usd", "cache_write_per_million_usd"):
            if given.HasField(optional):
                values[optional] = getattr(given, optional)
        for name, value in values.items():
            most = MAX_PRICE_PER_REQUEST if name == "per_request_usd" else MAX_PRICE_PER_MILLION
            if not 0 <= value <= most:  # NaN fails this too
                raise errors.invalid_argument(f"price.{name}", f"must be between 0 and {most:g}")
        effective = (
            given.effective_time.ToMilliseconds() if given.HasField("effective_time") else now_ms()
        )
        price = Price(
            given.prompt_per_million_usd,
            given.completion_per_million_usd,
            values.get("cached_prompt_per_million_usd"),
            given.per_request_usd,
            values.get("cache_write_per_million_usd"),
        )
        try:
            await self._prices.set(DatedPrice(model, effective, price), now_ms())
        except TooManyPrices as exc:
            raise errors.failed_precondition(str(exc), "TOO_MANY_PRICES", model=model) from None
        return price_message(DatedPrice(model, effective, price))

    async def ListModelPrices(
        self, request: usage_service_pb2.ListModelPricesRequest, context: ServicerContext
    ) -> usage_service_pb2.ListModelPricesResponse:
        require_superuser("listing prices")
        model = require_text("model", request.model, MAX_MODEL_LENGTH)
        page = parse_page(
            request.page_size, request.page_token, 0, ("prices", model), default_size=100
        )
        book = await self._prices.book()
        entries = [e for e in book.entries() if not model or e.model == model]
        # (model, time) in the entries' own order: a text key such as "gpt-4o|<time>" does
        # not sort like the entries ("gpt-4o-mini|" < "gpt-4o|"), which once repeated and
        # skipped prices across pages.
        keys = [(e.model, e.effective_ms) for e in entries]
        start = bisect.bisect_right(keys, _price_cursor(page.cursor)) if page.cursor else 0
        shown = entries[start : start + page.size]
        more = start + page.size < len(entries)
        last = keys[start + page.size - 1] if more else ("", 0)
        return usage_service_pb2.ListModelPricesResponse(
            prices=[price_message(p) for p in shown],
            next_page_token=page.token_after(f"{last[0]}|{last[1]}") if more else "",
        )

    async def DeleteModelPrice(
        self, request: usage_service_pb2.DeleteModelPriceRequest, context: ServicerContext
    ) -> usage_service_pb2.DeleteModelPriceResponse:
        require_superuser("deleting prices")
        model = require_model("model", request.model)
        if not await self._prices.delete(model, request.effective_time.ToMilliseconds()):
            raise errors.not_found("price", f"{model}@{request.effective_time.ToJsonString()}")
        return usage_service_pb2.DeleteModelPriceResponse()


def _price_cursor(cursor: str) -> tuple[str, int]:
    model, _, at = cursor.rpartition("|")
    try:
        return model, int(at)
    except ValueError:
        raise errors.invalid_argument("page_token", "malformed page token") from None


def price_message(dated: DatedPrice) -> usage_pb2.ModelPrice:
    price = dated.price
    message = usage_pb2.ModelPrice(
        model=dated.model,
        prompt_per_million_usd=price.prompt_per_million,
        completion_per_million_usd=price.completion_per_million,
        per_request_usd=price.per_request,
    )
    message.effective_time.FromMilliseconds(dated.effective_ms)
    # The prices in force for cache reads and writes: the prompt price when none was set.
    message.cached_prompt_per_million_usd = price.cached
    message.cache_write_per_million_usd = price.cache_write
    return message


def _sum_into(total: Counters, counters: Counters) -> None:
    for name in Counters.__slots__:
        setattr(total, name, getattr(total, name) + getattr(counters, name))


def _row(start: int, group: str, counters: Counters) -> dict[str, object]:
    totals = codec.to_json(totals_message(counters))
    return {
        "start_time": timestamp(start).ToJsonString(),  # type: ignore[union-attr]
        "group": group,
        **{name: totals[name] for name in CSV_COLUMNS[2:]},
    }


def _cell(text: str) -> str:
    """A group name as a CSV cell a spreadsheet will not run: model names are callers'
    text, and one starting with =, +, -, @ or a control character would be a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(rows: Sequence[Sequence[object]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


def _series_range(request: SeriesRequest) -> tuple[int, int, int]:
    """(start, end, bucket length) in ms, the start aligned to its bucket."""
    step = HOUR_MS if request.granularity == usage_pb2.GRANULARITY_HOUR else DAY_MS
    start = request.start_time.ToMilliseconds() // step * step
    end = request.end_time.ToMilliseconds() if request.HasField("end_time") else now_ms()
    if end <= start:
        raise errors.invalid_argument("end_time", "must be after start_time")
    if (end - start) / step > MAX_SERIES_BUCKETS:
        raise errors.invalid_argument(
            "end_time", f"the range holds more than {MAX_SERIES_BUCKETS} buckets"
        )
    return start, end, step
