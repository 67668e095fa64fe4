"""OpenTelemetry tracing and Prometheus metrics.

Traces are always produced (so trace ids reach the logs and peers); they are exported by
OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set. Redis commands are traced by the
opentelemetry-instrumentation-redis package. Prometheus serves on METRICS_PORT (0: off).
"""

from __future__ import annotations

import threading

from opentelemetry import trace
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
BUDGET_REJECTIONS = Counter("agentplane_budget_rejections_total", "Reservations refused")

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
                # Nothing to export to: spans still get ids (for logs and propagation to
                # peers) but are not recorded, which keeps the hot path cheap.
                provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
            trace.set_tracer_provider(provider)
            RedisInstrumentor().instrument(tracer_provider=provider)
            _state["tracing"] = provider
        if settings.metrics_port and "metrics" not in _state:
            port = 0 if settings.metrics_port == AUTO_PORT else settings.metrics_port
            server, _thread = start_http_server(port, addr=settings.bind_host)
            _state["metrics"] = server
            get_logger("agentplane.metrics").info("metrics", port=server.server_port)


def tracer() -> trace.Tracer:
    """The process's tracer (a proxy that follows the installed provider), made once."""
    cached = _state.get("tracer")
    if cached is None:
        cached = _state.setdefault("tracer", trace.get_tracer("agentplane"))
    return cached  # type: ignore[return-value]
