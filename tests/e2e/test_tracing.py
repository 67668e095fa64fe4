"""One trace across gateway → agent service → usage service → Redis (docs/api.md §6).

The test process installs a tracer provider with an in-memory exporter (every span
recorded), then follows one REST request through the in-process services."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.settings import Settings
from services.common.telemetry import configure_telemetry
from tests.helpers import ADMIN_TOKEN, make_project, make_type, spawn
from tests.helpers.servers import serve_gateway


class SwitchableExporter(InMemorySpanExporter):
    """Keeps spans only while a test listens (the provider lives for the whole session)."""

    listening = False

    def export(self, spans):  # type: ignore[no-untyped-def]
        return super().export(spans) if self.listening else super().export([])


EXPORTER = SwitchableExporter()


@pytest.fixture
def spans():
    configure_telemetry(Settings.from_env("tests", env={}), exporter=EXPORTER)
    EXPORTER.listening = True
    with trace.get_tracer("probe").start_as_current_span("probe"):
        pass
    if not any(s.name == "probe" for s in EXPORTER.get_finished_spans()):
        pytest.skip("another tracer provider was installed first in this process")
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.listening = False
    EXPORTER.clear()


async def test_one_trace_spans_gateway_services_and_redis(cluster, spans) -> None:
    if cluster.redis_cluster:
        pytest.skip("standalone is enough here")
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    agent = await spawn(cluster.agent, "traced")
    spans.clear()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with serve_gateway(cluster) as url, httpx.AsyncClient(base_url=url) as http:
        reply = await http.get(
            f"/api/v1/agents/{agent.id}",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}", "traceparent": parent},
        )
    assert reply.status_code == 200
    finished = spans.get_finished_spans()
    in_trace = [
        s
        for s in finished
        if format(s.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    ]
    names = {s.name for s in in_trace}
    assert "GET /api/v1/agents/{agent_id}" in names  # the gateway continued the caller's trace
    assert "/agentplane.agent.v1.AgentService/GetAgent" in names  # the agent service
    assert "/agentplane.usage.v1.UsageService/BatchGetAgentUsage" in names  # service → service
    kinds = {(s.name, s.kind) for s in in_trace}
    assert ("/agentplane.usage.v1.UsageService/BatchGetAgentUsage", trace.SpanKind.CLIENT) in kinds
    assert ("/agentplane.usage.v1.UsageService/BatchGetAgentUsage", trace.SpanKind.SERVER) in kinds
    redis_spans = [s for s in in_trace if s.attributes and s.attributes.get("db.system") == "redis"]
    assert redis_spans, names  # and on to Redis
