"""OTLP ingestion of GenAI spans (SPEC §16, §19): spans counted per second through
`TraceService/Export` on the usage service, shaped like `batch_throughput`'s records (the
same 1,000 per call, 4 calls in flight, agents, model and threads), so the two rates
compare the span conversion and nothing else: both ride the same recording path."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from bench.load import items_per_second, thread_of


def _attribute(key: str, value: str | int) -> common_pb2.KeyValue:
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def export_of(b: int, spans: int = 1000) -> trace_service_pb2.ExportTraceServiceRequest:
    """One export: a span per record, as an instrumented client would send them."""
    export = trace_service_pb2.ExportTraceServiceRequest()
    scope = export.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope.spans.add(
            trace_id=b.to_bytes(8, "big") + i.to_bytes(8, "big"),
            span_id=(i + 1).to_bytes(8, "big"), name="chat gpt-4o",
            start_time_unix_nano=1, end_time_unix_nano=300_000_001,
        )  # fmt: skip
        span.attributes.extend(_attribute(k, v) for k, v in (
            ("gen_ai.operation.name", "chat"), ("gen_ai.request.model", "gpt-4o"),
            ("gen_ai.usage.input_tokens", 100), ("gen_ai.usage.output_tokens", 20),
            ("gen_ai.agent.id", f"agent-{i % 8}"), ("agentplane.thread_id", thread_of(b, i)),
            ("server.address", "api.openai.com"),
        ))  # fmt: skip
    return export


async def otlp_throughput(channel: Any, batches: int = 40, in_flight: int = 4) -> float:
    """GenAI spans counted per second (every span must count: none rejected)."""
    stub = trace_service_pb2_grpc.TraceServiceStub(channel)
    exports = [export_of(b) for b in range(batches)]

    async def one(b: int) -> int:
        reply = await stub.Export(exports[b])
        assert not reply.partial_success.rejected_spans, reply.partial_success.error_message
        return sum(len(s.spans) for r in exports[b].resource_spans for s in r.scope_spans)

    return await items_per_second(one, batches, in_flight)
