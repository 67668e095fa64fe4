"""The chassis end to end: error mapping, deadlines, forwarding to peers, health, reflection."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from scripts.redis_server import RedisProcess
from services.agent_svc.server import SERVICE_NAME, create_server
from services.common import errors
from services.common.clients import open_channel
from services.common.interceptors import wrap_unary
from services.common.server import Chassis, create_app
from tests.helpers import ADMIN_TOKEN, authed_channel, expect_error, make_project, make_type, spawn
from tests.helpers.servers import make_settings

PROBE = "test.Probe"


def _probe_register(server: grpc.aio.Server, chassis: Chassis) -> list[str]:
    """A tiny service of raw-bytes methods that exercise the chassis."""
    peer_channel: dict[str, grpc.aio.Channel] = {}

    async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("secret internals: password=hunter2")

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.invalid_argument("thing.size", "must be small")

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(10)
        return b"late"

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        return json.dumps(
            {
                "authorization": metadata.get("authorization"),
                "traceparent": metadata.get("traceparent"),
                "remaining": context.time_remaining(),
            }
        ).encode()

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(1)  # so the forwarded deadline is visibly shorter
        channel = peer_channel.setdefault("c", open_channel(chassis.settings, request.decode()))
        return await channel.unary_unary(f"/{PROBE}/Echo")(b"")

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            wrap_unary("probe", f"/{PROBE}/{name}", fn, chassis.guard)
        )
        for name, fn in {
            "Boom": boom, "Refuse": refuse, "Slow": slow, "Echo": echo, "Forward": forward,
        }.items()
    }  # fmt: skip
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PROBE, handlers)])
    return [PROBE]


@pytest.fixture
async def probe(redis_url):
    app = await create_app(make_settings("probe", redis_url), "127.0.0.1:0", _probe_register)
    await app.start()
    channel = authed_channel(f"127.0.0.1:{app.port}")
    yield app, channel
    await channel.close()
    await app.stop(grace=0)


async def test_unexpected_errors_are_internal_and_leak_nothing(probe) -> None:
    _, channel = probe
    error = await expect_error(
        channel.unary_unary(f"/{PROBE}/Boom")(b""), grpc.StatusCode.INTERNAL, reason="INTERNAL"
    )
    assert "hunter2" not in error.details() and "RuntimeError" not in error.details()
    assert "trace" in error.details()


async def test_domain_errors_carry_their_details(probe) -> None:
    _, channel = probe
    error = await expect_error(
        channel.unary_unary(f"/{PROBE}/Refuse")(b""),
        grpc.StatusCode.INVALID_ARGUMENT,
        reason="INVALID_ARGUMENT",
        field="thing.size",
    )
    assert "thing.size" in error.details()


async def test_handler_stops_at_its_deadline(probe) -> None:
    _, channel = probe
    started = time.monotonic()
    await expect_error(
        channel.unary_unary(f"/{PROBE}/Slow")(b"", timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert time.monotonic() - started < 2


async def test_peer_calls_forward_token_trace_and_deadline(probe) -> None:
    app, channel = probe
    reply = await channel.unary_unary(f"/{PROBE}/Forward")(
        f"127.0.0.1:{app.port}".encode(),
        timeout=5,
        metadata=[
            ("authorization", f"Bearer {ADMIN_TOKEN}"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ],
    )
    seen = json.loads(reply)
    assert seen["authorization"] == f"Bearer {ADMIN_TOKEN}"
    assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert seen["remaining"] is not None and 0 < seen["remaining"] < 4.2


async def test_reflection_lists_the_service(redis_url) -> None:
    app, port = await create_server(make_settings("agent_svc", redis_url), "127.0.0.1:0")
    await app.start()

    def services() -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    try:
        listed = await asyncio.to_thread(services)
    finally:
        await app.stop(grace=0)
    assert SERVICE_NAME in listed and "grpc.health.v1.Health" in listed


async def test_reflection_v1_is_served_beside_v1alpha(redis_url) -> None:
    """grpc.reflection.v1 (what grpcurl and buf curl ask first) lists and describes too."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from grpc_reflection.v1alpha import reflection_pb2 as R

    app, port = await create_server(make_settings("agent_svc", redis_url), "127.0.0.1:0")
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for version in ("v1", "v1alpha"):
                call = channel.stream_stream(
                    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                    request_serializer=R.ServerReflectionRequest.SerializeToString,
                    response_deserializer=R.ServerReflectionResponse.FromString,
                )
                requests = [
                    R.ServerReflectionRequest(list_services=""),
                    R.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                    R.ServerReflectionRequest(
                        file_containing_symbol="grpc.reflection.v1.ServerReflection"
                    ),
                ]
                replies = [reply async for reply in call(iter(requests))]
                listed = {s.name for s in replies[0].list_services_response.service}
                assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection",
                        "grpc.reflection.v1alpha.ServerReflection"} <= listed  # fmt: skip
                assert replies[1].file_descriptor_response.file_descriptor_proto
                assert replies[2].file_descriptor_response.file_descriptor_proto, version
        buf = Path(sys.executable).with_name("buf")
        if buf.exists() or shutil.which("buf"):
            listed_by_buf = await asyncio.to_thread(
                subprocess.run,
                [str(buf if buf.exists() else "buf"), "curl", "--protocol", "grpc",
                 "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1", "--list-services",
                 f"http://127.0.0.1:{port}"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert SERVICE_NAME in listed_by_buf.stdout, listed_by_buf.stderr
    finally:
        await app.stop(grace=0)


async def _health(port: int, service: str) -> int:
    async with authed_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


async def _eventually(predicate, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_redis_outage_fails_fast_flips_health_and_recovers(tmp_path) -> None:
    redis = RedisProcess(data_dir=str(tmp_path), extra_args=["--appendonly", "yes"]).start()
    app, port = await create_server(make_settings("agent_svc", redis.url), "127.0.0.1:0")
    await app.start()
    channel = authed_channel(f"127.0.0.1:{port}")
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    try:
        await make_project(stub)
        await make_type(stub)
        agent = await spawn(stub, "survivor")
        for service in ("", SERVICE_NAME):
            assert await _health(port, service) == health_pb2.HealthCheckResponse.SERVING

        redis.stop(kill=True)
        started = time.monotonic()
        await expect_error(
            stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent.id), timeout=5),
            grpc.StatusCode.UNAVAILABLE,
            reason="STORAGE_UNAVAILABLE",
        )
        assert time.monotonic() - started < 3, "must fail fast, well within the deadline"

        async def not_serving() -> bool:
            return all(
                [await _health(port, s) == health_pb2.HealthCheckResponse.NOT_SERVING
                 for s in ("", SERVICE_NAME)]
            )  # fmt: skip

        await _eventually(not_serving)

        redis.start()

        async def serving() -> bool:
            return await _health(port, "") == health_pb2.HealthCheckResponse.SERVING

        await _eventually(serving)
        again = await stub.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=agent.id), timeout=5)
        assert again.name == "survivor"
    finally:
        await channel.close()
        await app.stop(grace=0)
        redis.stop()


async def test_redis_out_of_memory_is_a_clear_unavailable_not_internal() -> None:
    """Redis at maxmemory (noeviction) refuses writes with OOM: callers get UNAVAILABLE
    naming the cause, nothing is half-written, and writes work again once there is room."""
    from agentplane.usage.v1 import usage_service_pb2 as U
    from agentplane.usage.v1 import usage_service_pb2_grpc
    from services.usage_svc.server import create_server as create_usage_server

    with RedisProcess() as redis:
        app, port = await create_server(make_settings("agent_svc", redis.url), "127.0.0.1:0")
        usage, usage_port = await create_usage_server(
            make_settings("usage_svc", redis.url), "127.0.0.1:0"
        )
        await app.start()
        await usage.start()
        try:
            async with (
                authed_channel(f"127.0.0.1:{port}") as channel,
                authed_channel(f"127.0.0.1:{usage_port}") as usage_channel,
            ):
                stub = agent_service_pb2_grpc.AgentServiceStub(channel)
                usage_stub = usage_service_pb2_grpc.UsageServiceStub(usage_channel)
                await make_project(stub, "before")
                await app.chassis.redis.config_set("maxmemory", 1)
                try:
                    error = await expect_error(
                        make_project(stub, "during"), grpc.StatusCode.UNAVAILABLE,
                        reason="STORAGE_FULL",
                    )  # fmt: skip
                    assert "maxmemory" in error.details()
                    await expect_error(
                        usage_stub.SetThreadBudget(
                            U.SetThreadBudgetRequest(
                                project_id="demo", thread_id="t", max_tokens=10
                            )
                        ),
                        grpc.StatusCode.UNAVAILABLE,
                        reason="STORAGE_FULL",
                    )
                    # Reads still work.
                    listed = await stub.ListProjects(agent_service_pb2.ListProjectsRequest())
                    assert [p.id for p in listed.projects] == ["before"]
                finally:
                    await app.chassis.redis.config_set("maxmemory", 0)
                await make_project(stub, "after")
                listed = await stub.ListProjects(agent_service_pb2.ListProjectsRequest())
                assert sorted(p.id for p in listed.projects) == ["after", "before"]
        finally:
            await app.stop(grace=0)
            await usage.stop(grace=0)
