"""OpenTelemetry tracing and Prometheus metrics.

Spans are recorded only when something takes them: OTLP (OTEL_EXPORTER_OTLP_ENDPOINT) or a
test's exporter; then every RPC, peer call and Redis command (the
opentelemetry-instrumentation-redis package) is a span. Otherwise `server_span` makes no
span at all: it only puts trace ids in the context — the caller's `traceparent`, passed
through unchanged, or new random ids — so log lines, error messages and peer calls still
carry them, at the cost of a context switch instead of a span's bookkeeping.
Prometheus serves on METRICS_PORT (0: off).
"""

from __future__ import annotations

import random
import threading
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from prometheus_client import Counter, Histogram, start_http_server

from services.common.logging import get_logger
from services.common.settings import AUTO_PORT, Settings

RPC_TOTAL = Counter(
    "agentplane_rpc_total", "RPCs served, by method and status code", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "agentplane_rpc_duration_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKENS_RECORDED = Counter("agentplane_tokens_recorded_total", "LLM tokens recorded", ["kind"])
COST_RECORDED = Counter("agentplane_cost_recorded_micros_total", "Cost recorded, micro-USD")
BUDGET_REJECTIONS = Counter(
    "agentplane_budget_rejections_total",
    "Reservations refused, by what refused them: thread (a thread budget), calendar (a "
    "day/week/month/lifetime budget), window (a minute/hour window), inflight "
    "(max_in_flight)",
    ["reason"],
)

# The model gateway (SPEC §14). `model` is a configured model's name ("-" for a call
# refused before its model was known, or naming no configured model).
MODEL_CALLS = Counter(
    "agentplane_model_calls_total",
    "Model gateway calls, by model and outcome",
    ["model", "outcome"],
)
MODEL_TOKENS = Counter(
    "agentplane_model_tokens_total",
    "Tokens of model gateway calls, by model and kind (prompt, completion, cached, "
    "cache_write, reasoning; estimated counts included)",
    ["model", "kind"],
)
MODEL_COST = Counter(
    "agentplane_model_cost_micros_total", "Cost of model gateway calls, micro-USD", ["model"]
)
MODEL_REFUSALS = Counter(
    "agentplane_model_refusals_total",
    "Model gateway calls refused before going upstream, by code (invalid_api_key, "
    "agent_paused, budget_exceeded, rate_limited, ...)",
    ["reason"],
)
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MODEL_TTFT = Histogram(
    "agentplane_model_time_to_first_token_seconds",
    "From a call's arrival to the first byte of its answer sent to the caller",
    ["model"], buckets=_CALL_BUCKETS,
)  # fmt: skip
MODEL_DURATION = Histogram(
    "agentplane_model_call_duration_seconds", "Model gateway calls, arrival to the end",
    ["model"], buckets=_CALL_BUCKETS,
)  # fmt: skip

_lock = threading.Lock()
_state: dict[str, object] = {}


def configure_telemetry(settings: Settings, exporter: SpanExporter | None = None) -> None:
    """Install the tracer provider and start the metrics endpoint, once per process.
    `exporter` (tests) records every span synchronously instead of the OTLP exporter."""
    with _lock:
        if "tracing" not in _state:
            resource = Resource.create({"service.name": settings.service_name})
            if exporter is not None:
                provider = TracerProvider(resource=resource)
                provider.add_span_processor(SimpleSpanProcessor(exporter))
            elif settings.otlp_endpoint:
                provider = TracerProvider(resource=resource)
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                # Nothing takes spans: `server_span` makes none (trace ids only), and any
                # library span is dropped at once.
                provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
            trace.set_tracer_provider(provider)
            if recording := exporter is not None or bool(settings.otlp_endpoint):
                RedisInstrumentor().instrument(tracer_provider=provider)
            _state["tracing"] = provider
            _state["recording"] = recording
        if settings.metrics_port and "metrics" not in _state:
            port = 0 if settings.metrics_port == AUTO_PORT else settings.metrics_port
            server, _thread = start_http_server(port, addr=settings.bind_host)
            _state["metrics"] = server
            get_logger("agentplane.metrics").info("metrics", port=server.server_port)


def recording() -> bool:
    """Whether spans are recorded (an exporter is configured)."""
    return _state.get("recording") is True


class Span(Protocol):
    def fail(self, message: str) -> None: ...
    def set(self, attributes: dict[str, str | int | bool]) -> None: ...
    def end(self) -> None: ...
    def abandon(self) -> None: ...


class _RecordedSpan:
    """An OpenTelemetry span, current until `end`."""

    __slots__ = ("_manager", "_span")

    def __init__(self, name: str, carrier: dict[str, str], kind: trace.SpanKind) -> None:
        self._manager = tracer().start_as_current_span(
            name, context=propagate.extract(carrier), kind=kind
        )
        self._span = self._manager.__enter__()

    def fail(self, message: str) -> None:
        self._span.set_status(trace.Status(trace.StatusCode.ERROR, message))

    def set(self, attributes: dict[str, str | int | bool]) -> None:
        self._span.set_attributes(attributes)

    def end(self) -> None:
        self._manager.__exit__(None, None, None)

    def abandon(self) -> None:
        """End the span from outside the task whose context holds it."""
        self._span.end()


class _TraceIds:
    """No span: the caller's trace context (or new ids) made current, nothing recorded."""

    __slots__ = ("_token",)

    def __init__(self, traceparent: str | None) -> None:
        context = _parse_traceparent(traceparent) if traceparent else None
        if context is None:
            context = trace.SpanContext(
                random.getrandbits(128) | 1, random.getrandbits(64) | 1, is_remote=False
            )
        span = trace.NonRecordingSpan(context)
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def fail(self, message: str) -> None:
        pass

    def set(self, attributes: dict[str, str | int | bool]) -> None:
        pass

    def end(self) -> None:
        otel_context.detach(self._token)

    def abandon(self) -> None:
        pass


def _parse_traceparent(value: str) -> trace.SpanContext | None:
    """W3C `00-<trace id>-<parent id>-<flags>`; None if it is not one."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not (trace_id and span_id) or parts[0] == "ff":
        return None
    return trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))


def server_span(name: str, carrier: dict[str, str], kind: Any = trace.SpanKind.SERVER) -> Span:
    """The span of one request (current until `end`): recorded when spans are exported,
    else trace ids only (see the module's docstring)."""
    if recording():
        return _RecordedSpan(name, carrier, kind)
    return _TraceIds(carrier.get("traceparent"))


def tracer() -> trace.Tracer:
    """The process's tracer (a proxy that follows the installed provider), made once."""
    cached = _state.get("tracer")
    if cached is None:
        cached = _state.setdefault("tracer", trace.get_tracer("agentplane"))
    return cached  # type: ignore[return-value]
