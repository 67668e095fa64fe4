"""Usage from OpenTelemetry (SPEC §16): the official OpenTelemetry SDK and its OTLP/gRPC
exporter send GenAI spans to the usage service with an agent's key in the exporter's
headers; each span's usage is counted once — also when the same spans are exported
again, to the same replica or another — spans of the model gateway's own calls and spans without GenAI usage are not,
and spans that cannot be counted come back in `partial_success` with the reason."""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from services.usage_svc.server import create_server as create_usage_server
from tests.helpers import make_project, make_type
from tests.helpers.servers import ADMIN_TOKEN, make_settings, start_cluster, stop_cluster
from tests.models.conftest import agent_key


class Keep(SpanExporter):
    """Keeps the finished spans, to export them (and again) with the real exporter."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans):  # type: ignore[no-untyped-def]
        self.spans += spans
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def gen_ai_spans() -> list[ReadableSpan]:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    keep = Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "an-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("chat gpt-4o") as span:
        span.set_attributes({
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 1000,
            "gen_ai.usage.output_tokens": 200, "gen_ai.usage.cache_read.input_tokens": 400,
            "gen_ai.usage.reasoning.output_tokens": 50,
        })  # fmt: skip
    with tracer.start_as_current_span("chat claude") as span:  # Anthropic's input, as is
        span.set_attributes({
            "gen_ai.request.model": "claude-sonnet-4", "gen_ai.usage.input_tokens": 10,
            "gen_ai.usage.output_tokens": 5, "gen_ai.usage.cache_read.input_tokens": 300,
            "gen_ai.usage.cache_creation.input_tokens": 90,
        })  # fmt: skip
    with tracer.start_as_current_span("through the gateway") as span:
        span.set_attributes({"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 7,
                             "agentplane.call_id": "01J0000000000000000000000"})  # fmt: skip
    with tracer.start_as_current_span("GET /health"):
        pass
    return keep.spans


async def test_genai_spans_count_once_through_the_otlp_exporter(redis_url) -> None:
    cluster = await start_cluster(redis_url)
    usage_app, port = await create_usage_server(
        make_settings("usage_svc", redis_url, agent_svc_addr=cluster.address("agent"),
                      thread_svc_addr=cluster.address("thread"),
                      model_gateway_addresses="models.example:8090, gw.example"),
        "127.0.0.1:0")  # fmt: skip
    await usage_app.start()
    try:
        await make_project(cluster.agent)
        await make_type(cluster.agent)
        agent_id, token = await agent_key(cluster, "instrumented")
        # A HARD budget far below the spans' usage: the calls already happened, so they
        # count in full and the budget shows them past its limit.
        await cluster.usage.CreateBudget(U.CreateBudgetRequest(project_id="demo", budget=B.Budget(
            scope=B.BUDGET_SCOPE_PROJECT, limit_tokens=100, period=B.BUDGET_PERIOD_MONTH,
            enforcement=B.BUDGET_ENFORCEMENT_HARD)))  # fmt: skip
        spans = await asyncio.to_thread(gen_ai_spans)
        other_app, other_port = await create_usage_server(
            make_settings("usage_svc", redis_url, agent_svc_addr=cluster.address("agent"),
                          thread_svc_addr=cluster.address("thread")), "127.0.0.1:0")  # fmt: skip
        await other_app.start()
        # The same spans exported twice to one replica and once to another count once.
        for replica in (port, port, other_port):
            exporter = OTLPSpanExporter(
                endpoint=f"127.0.0.1:{replica}", insecure=True,
                headers=(("authorization", f"Bearer {token}"),),
            )  # fmt: skip
            assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
            await asyncio.to_thread(exporter.shutdown)
        await other_app.stop(grace=0)
        totals = (
            await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))
        ).totals
        assert totals.request_count == 2
        assert (totals.prompt_tokens, totals.completion_tokens) == (1000 + 400, 200 + 5)
        assert (totals.cached_prompt_tokens, totals.cache_write_tokens) == (400 + 300, 90)
        assert totals.reasoning_tokens == 50 and totals.total_cost_micros > 0
        (budget,) = (
            await cluster.usage.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
        ).budgets
        assert budget.used_tokens == 1400 + 205 and budget.is_exhausted

        # Spans that cannot be counted: partial_success says which and why; nothing counted.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            bad = trace_service_pb2.ExportTraceServiceRequest()
            scope = bad.resource_spans.add().scope_spans.add()
            for n, attributes in enumerate([
                {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": -5},
                {"gen_ai.usage.input_tokens": 5},
                {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.output_tokens": 10**13},
            ]):  # fmt: skip
                span = scope.spans.add(
                    trace_id=bytes(15) + bytes([n + 1]), span_id=bytes(7) + b"\x01"
                )
                for key, value in attributes.items():
                    attribute = span.attributes.add(key=key)
                    if isinstance(value, int):
                        attribute.value.int_value = value
                    else:
                        attribute.value.string_value = value
            reply = await stub.Export(bad, metadata=[("authorization", f"Bearer {token}")])
            assert reply.partial_success.rejected_spans == 3
            message = reply.partial_success.error_message
            assert "must not be negative" in message and "no gen_ai.response.model" in message
            assert "completion_tokens: must be between 0 and" in message
            try:
                await stub.Export(bad, metadata=[("authorization", "Bearer nope")])
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                raise AssertionError("an unknown key was let in")
        after = (
            await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))
        ).totals
        assert after.request_count == 2

        # What counts and what does not: a framework's own agent name does not move an
        # agent key's usage; `cache_write` is read as cache_creation; an aggregating span
        # and a call sent to a model gateway of MODEL_GATEWAY_ADDRESSES are not counted.
        mixed = trace_service_pb2.ExportTraceServiceRequest()
        chat = {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 100,
                "gen_ai.usage.output_tokens": 10}  # fmt: skip
        _span(mixed, 11, **chat, **{"gen_ai.agent.id": "planner",
                                    "gen_ai.usage.cache_write.input_tokens": 60})  # fmt: skip
        _span(mixed, 12, **chat, **{"gen_ai.operation.name": "invoke_agent"})
        _span(mixed, 13, **chat, **{"server.address": "models.example", "server.port": 8090})
        _span(mixed, 14, **chat, **{"server.address": "GW.example"})  # port 443 left out
        _span(mixed, 15, **chat, **{"server.address": "api.openai.com", "server.port": 443,
                                    "gen_ai.operation.name": "chat"})  # fmt: skip
        _span(mixed, 16, **chat, **{"server.address": "models.example", "server.port": 9999})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                mixed, metadata=[("authorization", f"Bearer {token}")]
            )
        assert not reply.HasField("partial_success")
        last = (await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))).totals
        assert last.request_count == 2 + 3  # spans 11, 15 and 16
        assert last.prompt_tokens - after.prompt_tokens == 300
        assert last.cache_write_tokens - after.cache_write_tokens == 60
    finally:
        await usage_app.stop(grace=0)
        await stop_cluster(cluster)


async def test_otlp_http_on_the_gateway_protobuf_json_and_gzip(redis_url) -> None:
    """`POST /v1/traces` on the operators' gateway: the official HTTP exporter (protobuf,
    gzip), an OTLP/JSON body with hex ids, and malformed bodies refused with the field."""
    import gzip

    import httpx
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    from tests.helpers.servers import serve_gateway

    cluster = await start_cluster(redis_url)
    try:
        await make_project(cluster.agent)
        await make_type(cluster.agent)
        agent_id, token = await agent_key(cluster, "instrumented")
        spans = await asyncio.to_thread(gen_ai_spans)
        async with serve_gateway(cluster) as url:
            exporter = HttpExporter(endpoint=f"{url}/v1/traces", compression=Compression.Gzip,
                                    headers={"authorization": f"Bearer {token}"})  # fmt: skip
            for _ in range(2):
                assert await asyncio.to_thread(exporter.export, spans) == SpanExportResult.SUCCESS
            totals = (
                await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))
            ).totals
            assert totals.request_count == 2 and totals.prompt_tokens == 1400
            body = {"resourceSpans": [{"scopeSpans": [{"spans": [{
                "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
                "name": "chat", "attributes": [
                    {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o"}},
                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "30"}},
                    {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "3"}}]}]}]}]}  # fmt: skip
            headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
            async with httpx.AsyncClient(base_url=url, headers=headers) as http:
                answer = await http.post("/v1/traces", json=body)
                assert answer.status_code == 200 and answer.json() == {}
                again = await http.post("/v1/traces", content=gzip.compress(orjson_dumps(body)),
                                        headers={"content-encoding": "gzip"})  # fmt: skip
                assert again.status_code == 200
                bad = await http.post("/v1/traces", content=b"{nope")
                assert bad.status_code == 400 and "body" in bad.text
                bomb = await http.post("/v1/traces", content=gzip.compress(b"0" * (64 << 20)),
                                       headers={"content-encoding": "gzip"})  # fmt: skip
                assert bomb.status_code == 400 and "inflates past" in bomb.text
                garbage = await http.post("/v1/traces", content=b"\xff\x00garbage",
                                          headers={"content-type": "application/x-protobuf"})  # fmt: skip
                assert garbage.status_code == 400
                stranger = await http.post(
                    "/v1/traces", json=body, headers={"authorization": "Bearer x"}
                )
                assert stranger.status_code == 401
            totals = (
                await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=agent_id))
            ).totals
            assert totals.request_count == 3 and totals.prompt_tokens == 1430  # the JSON span once
    finally:
        await stop_cluster(cluster)


def orjson_dumps(value: object) -> bytes:
    import orjson

    return orjson.dumps(value)


def _span(
    request: trace_service_pb2.ExportTraceServiceRequest, n: int, **attributes: object
) -> None:
    scope = request.resource_spans.add().scope_spans.add()
    span = scope.spans.add(trace_id=bytes(15) + bytes([n]), span_id=bytes(7) + bytes([n]))
    for key, value in attributes.items():
        attribute = span.attributes.add(key=key)
        if isinstance(value, int):
            attribute.value.int_value = value
        else:
            attribute.value.string_value = str(value)


async def test_an_owner_key_counts_its_own_agents_on_either_replica_once(redis_url) -> None:
    """An owner key names the agent (`gen_ai.agent.id`): one of its project's counts, one of
    another project's is refused in partial_success, none at all counts in the project's
    totals and no agent's; the same spans sent to two usage replicas count once. A
    superuser export must name the agent."""
    from agentplane.agent.v1 import agent_service_pb2 as A
    from agentplane.agent.v1 import api_key_pb2, project_pb2
    from tests.helpers import spawn

    cluster = await start_cluster(redis_url)
    apps = []
    try:
        for name, owner in (("alices", "alice"), ("other", "bob")):
            await cluster.agent.CreateProject(A.CreateProjectRequest(
                project_id=name, project=project_pb2.Project(display_name=name, owner=owner)))  # fmt: skip
        await make_type(cluster.agent)
        mine = await spawn(cluster.agent, "mine", project_id="alices")
        stranger = await spawn(cluster.agent, "stranger", project_id="other")
        key = await cluster.agent.CreateApiKey(A.CreateApiKeyRequest(
            role=api_key_pb2.API_KEY_ROLE_OWNER, subject="alice", project_id="alices"))  # fmt: skip
        ports = []
        for _ in range(2):
            app, port = await create_usage_server(
                make_settings("usage_svc", redis_url, agent_svc_addr=cluster.address("agent"),
                              thread_svc_addr=cluster.address("thread")), "127.0.0.1:0")  # fmt: skip
            await app.start()
            apps.append(app)
            ports.append(port)
        export = trace_service_pb2.ExportTraceServiceRequest()
        _span(export, 1, **{"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 40,
                            "gen_ai.usage.output_tokens": 2, "gen_ai.agent.id": mine.id})  # fmt: skip
        _span(export, 2, **{"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 9,
                            "gen_ai.agent.id": stranger.id})  # fmt: skip
        _span(export, 3, **{"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5})
        for port in ports:  # both replicas get the same export
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                    export, metadata=[("authorization", f"Bearer {key.token}")]
                )
            assert reply.partial_success.rejected_spans == 1
            assert (
                f"no agent {stranger.id!r} in project 'alices'"
                in reply.partial_success.error_message
            )
        counted = (
            await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=mine.id))
        ).totals
        assert (counted.request_count, counted.total_tokens) == (1, 42)
        foreign = (
            await cluster.usage.GetAgentUsage(U.GetAgentUsageRequest(agent_id=stranger.id))
        ).totals
        assert foreign.request_count == 0
        overview = await cluster.usage.GetUsageOverview(
            U.GetUsageOverviewRequest(project_id="alices")
        )
        assert (overview.totals.request_count, overview.totals.total_tokens) == (2, 47)
        assert [a.agent_id for a in overview.by_agent] == [mine.id]

        # The superuser must name the agent.
        anonymous = trace_service_pb2.ExportTraceServiceRequest()
        _span(anonymous, 9, **{"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 5,
                               "agentplane.project_id": "alices"})  # fmt: skip
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            reply = await trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                anonymous, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")]
            )
        assert reply.partial_success.rejected_spans == 1
        assert "must name the agent" in reply.partial_success.error_message
    finally:
        for app in apps:
            await app.stop(grace=0)
        await stop_cluster(cluster)
