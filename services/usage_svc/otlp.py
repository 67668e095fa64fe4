"""Usage from OpenTelemetry (SPEC §16): `TraceService/Export` on the usage service's gRPC
port takes OTLP trace exports of agents whose LLM calls bypass the model gateway, and
counts the usage in their GenAI spans exactly once, through the same recording path as
`RecordUsageBatch` (budgets, alerts, buckets, prices).

A span counts when it carries `gen_ai.usage.input_tokens` or
`gen_ai.usage.output_tokens` (the GenAI conventions of opentelemetry-semantic-conventions
0.66b2; the older `gen_ai.usage.prompt_tokens` / `completion_tokens` are read too), with
`gen_ai.usage.cache_read.input_tokens`, `gen_ai.usage.cache_creation.input_tokens` (or
`cache_write`) and
`gen_ai.usage.reasoning.output_tokens`. Its usage id is `otel-<trace id>-<span id>`, so a
re-exported span counts once. The model is `gen_ai.response.model`, else
`gen_ai.request.model`; the agent is the API key's (an owner key may name one of its
project's agents in `gen_ai.agent.id`); the thread is `agentplane.thread_id`. Spans of
calls made through this installation's model gateway (they carry `agentplane.call_id`)
are skipped — the gateway metered them — and so are the client spans of calls sent to it
(`server.address`:`server.port` in MODEL_GATEWAY_ADDRESSES, or a `gen_ai.response.id` the
gateway kept from the provider's answer); aggregating spans
(`invoke_agent`, `execute_tool`, ...) and spans without GenAI usage are dropped without a
word. A span that cannot be counted is reported in `partial_success` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpc.aio import ServicerContext
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agentplane.usage.v1 import usage_service_pb2
from services.common.auth import AGENT, Principal
from services.common.context import current_principal
from services.common.convert import RESPONSE_ID
from services.common.limits import MAX_LATENCY_MS
from services.usage_svc.call_log import CallLog

INPUT = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
CACHE_READ = "gen_ai.usage.cache_read.input_tokens"
CACHE_WRITE = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_write.input_tokens")
REASONING = "gen_ai.usage.reasoning.output_tokens"
GATEWAY_MARK = "agentplane.call_id"  # set on every span of the model gateway's calls
USAGE_KEYS = frozenset(INPUT + OUTPUT)
# Inference operations; aggregating spans (invoke_agent, execute_tool, workflows...) sum
# their children's usage and would count it twice. No operation name counts as inference.
INFERENCE = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# The attributes read (the rest of a span's are never looked at).
READ = USAGE_KEYS | {
    CACHE_READ, *CACHE_WRITE, REASONING, GATEWAY_MARK, "gen_ai.operation.name",
    "gen_ai.response.model", "gen_ai.request.model", "gen_ai.response.id", "gen_ai.agent.id",
    "agentplane.thread_id", "agentplane.project_id", "server.address", "server.port",
}  # fmt: skip
Attributes = dict[str, Any]  # a span's attributes that are READ, as plain values
MAX_REASONS = 5  # reasons spelled out in partial_success (the count has them all)
MAX_SPANS = 10_000  # spans counted per export


def wire_id(text: str) -> bool:
    """A response id as the model gateway keeps them (others were never metered there)."""
    return RESPONSE_ID.fullmatch(text) is not None


class SpanRejected(Exception):
    """A GenAI span that cannot be counted; the message says why."""


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _count(attributes: Attributes, *keys: str) -> int:
    for key in keys:
        value = attributes.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise SpanRejected(f"{key} must be a whole number, got {value!r}")
        if value < 0:
            raise SpanRejected(f"{key} must not be negative, got {value}")
        return int(value)
    return 0


@dataclass
class Converted:
    requests: list[usage_service_pb2.RecordUsageRequest] = field(default_factory=list)
    response_ids: list[str] = field(default_factory=list)  # gen_ai.response.id, by request
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)

    def drop(self, metered: set[tuple[str, str]]) -> None:
        """Leave out the requests whose (project, response id) the gateway metered."""
        kept = [
            (request, rid)
            for request, rid in zip(self.requests, self.response_ids, strict=True)
            if (request.project_id, rid) not in metered
        ]
        self.requests = [request for request, _ in kept]
        self.response_ids = [rid for _, rid in kept]


def gateway_address(host: str, port: int | None) -> str:
    """`host:port` as spans and MODEL_GATEWAY_ADDRESSES compare it: the host in lower case
    without IPv6 brackets, the port left out when it is a default one, 80 or 443 (clients drop
    it: the OpenAI instrumentation reads httpx's URL.port)."""
    host = host.strip().strip("[]").lower()
    return host if port in (None, 0, 80, 443) else f"{host}:{port}"


def parse_gateway_addresses(text: str) -> frozenset[str]:
    """MODEL_GATEWAY_ADDRESSES: comma-separated `host:port` (or `host` for ports 80/443)."""
    addresses = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = item.rpartition(":")
        if sep and port.isdigit() and "]" not in port:
            addresses.add(gateway_address(host, int(port)))
        else:
            addresses.add(gateway_address(item, None))
    return frozenset(addresses)


def _through_gateway(attributes: Attributes, gateways: frozenset[str]) -> bool:
    """The model gateway metered this call: its own span, or a client span sent to it."""
    if GATEWAY_MARK in attributes:
        return True
    host = attributes.get("server.address")
    if not gateways or not isinstance(host, str):
        return False
    port = attributes.get("server.port")
    return gateway_address(host, port if isinstance(port, int) else None) in gateways


def _counted(attributes: Attributes, gateways: frozenset[str]) -> bool:
    """An inference span with usage that the model gateway did not meter."""
    if not USAGE_KEYS & attributes.keys():
        return False
    operation = attributes.get("gen_ai.operation.name")
    if operation is not None and operation not in INFERENCE:
        return False
    return not _through_gateway(attributes, gateways)


def usage_requests(
    export: trace_service_pb2.ExportTraceServiceRequest,
    principal: Principal,
    gateways: frozenset[str] = frozenset(),
) -> Converted:
    """The RecordUsage requests of an export's GenAI spans, and the spans rejected."""
    converted = Converted()
    for resource_spans in export.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = {kv.key: _value(kv.value) for kv in span.attributes if kv.key in READ}
                if not _counted(attributes, gateways):
                    continue  # not an LLM call's span, an aggregate, or metered already
                name = f"span {span.span_id.hex()}"
                if len(converted.requests) >= MAX_SPANS:
                    converted.reject(f"{name}: more than {MAX_SPANS} GenAI spans in one export")
                    continue
                try:
                    converted.requests.append(_request(span, attributes, principal))
                    converted.response_ids.append(str(attributes.get("gen_ai.response.id") or ""))
                except SpanRejected as exc:
                    converted.reject(f"{name}: {exc}")
    return converted


def _request(
    span: trace_pb2.Span, attributes: Attributes, principal: Principal
) -> usage_service_pb2.RecordUsageRequest:
    if len(span.trace_id) != 16 or len(span.span_id) != 8:
        raise SpanRejected("trace_id must be 16 bytes and span_id 8")
    model = str(
        attributes.get("gen_ai.response.model")
        or attributes.get("gen_ai.request.model") or ""
    )  # fmt: skip
    if not model:
        raise SpanRejected("no gen_ai.response.model or gen_ai.request.model")
    agent = _agent(attributes, principal)
    inputs, outputs = _count(attributes, *INPUT), _count(attributes, *OUTPUT)
    read, write = _count(attributes, CACHE_READ), _count(attributes, *CACHE_WRITE)
    reasoning = _count(attributes, REASONING)
    # The conventions count cache reads and writes in input_tokens; an instrumentation
    # that reports Anthropic's input_tokens as they come (without them) shows fewer.
    prompt = inputs if inputs >= read + write else inputs + read + write
    elapsed = (span.end_time_unix_nano - span.start_time_unix_nano) // 1_000_000
    return usage_service_pb2.RecordUsageRequest(
        usage_id=f"otel-{span.trace_id.hex()}-{span.span_id.hex()}",
        thread_id=str(attributes.get("agentplane.thread_id") or ""),
        agent_id=agent, model=model, project_id=principal.project_id or _project(attributes),
        prompt_tokens=prompt, completion_tokens=max(outputs, reasoning),
        cached_prompt_tokens=read, cache_write_tokens=write, reasoning_tokens=reasoning,
        latency_ms=max(0, min(elapsed, MAX_LATENCY_MS)),
    )  # fmt: skip


def _agent(attributes: Attributes, principal: Principal) -> str:
    """An agent key's own agent, whatever the span says (frameworks put their own names in
    `gen_ai.agent.id`); an owner key's span may name one of its project's there (else the
    record has no agent: it counts in the project's totals, no agent's); a superuser's
    must name one."""
    if principal.role == AGENT:
        return principal.subject
    given = str(attributes.get("gen_ai.agent.id") or "")
    if not given and principal.is_superuser:
        raise SpanRejected("a superuser export must name the agent in gen_ai.agent.id")
    return given


def _project(attributes: Attributes) -> str:
    """The project an unlimited owner key's span names (`agentplane.project_id`)."""
    return str(attributes.get("agentplane.project_id") or "")


class TraceIngest:
    """`opentelemetry.proto.collector.trace.v1.TraceService` on the usage service."""

    def __init__(self, usage: Any, calls: CallLog, gateways: frozenset[str] = frozenset()) -> None:
        self._usage = usage  # the UsageServicer: its record_many is the one recording path
        self._calls = calls  # which provider answers the model gateway metered
        self._gateways = gateways  # MODEL_GATEWAY_ADDRESSES

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        converted = usage_requests(request, current_principal(), self._gateways)
        await self._skip_metered(converted)
        _, failed = await self._usage.record_many(converted.requests, spans=True)
        for position, error in sorted(failed.items()):
            converted.reject(f"{converted.requests[position].usage_id}: {error}")
        response = trace_service_pb2.ExportTraceServiceResponse()
        if converted.rejected:
            response.partial_success.rejected_spans = converted.rejected
            response.partial_success.error_message = "; ".join(converted.reasons)
        return response

    async def _skip_metered(self, converted: Converted) -> None:
        """Drop the spans of calls the model gateway metered, known by the provider's
        answer id (`gen_ai.response.id`): a client whose spans carry no server address
        (or one not in MODEL_GATEWAY_ADDRESSES) still counts once."""
        asked: dict[str, list[str]] = {}
        for request, rid in zip(converted.requests, converted.response_ids, strict=True):
            if rid and wire_id(rid):
                asked.setdefault(request.project_id, []).append(rid)
        metered: set[tuple[str, str]] = set()
        for project, ids in asked.items():
            if project:
                metered |= {(project, i) for i in await self._calls.metered(project, ids)}
        if metered:
            converted.drop(metered)
