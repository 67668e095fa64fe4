"""The real `python -m services.agent_svc` process: serving, reflection, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from tests.helpers import authed_channel, make_project
from tests.helpers.processes import ServiceProcess


def start_service(module: str, redis_url: str, **env: str) -> ServiceProcess:
    """A service process on a port of its own choosing (port 0, read back from its log)."""
    return ServiceProcess(module, REDIS_URL=redis_url, **env)


async def wait_serving(where: int | str, timeout: float = 20) -> None:
    """Until the service at a port (or an address) says SERVING."""
    deadline = time.monotonic() + timeout
    address = where if isinstance(where, str) else f"127.0.0.1:{where}"
    async with authed_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"service at {address} never became SERVING")


@pytest.mark.parametrize("module", ["services.usage_svc", "services.thread_svc"])
async def test_every_service_drains_on_sigterm(redis_url, module) -> None:
    service = start_service(module, redis_url)
    process = service.process
    try:
        port = service.port()
        await wait_serving(port)
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(signal.SIGTERM)
            status = await asyncio.wait_for(health.read(), 5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()


async def test_sigterm_turns_not_serving_ends_streams_and_exits_zero(redis_url) -> None:
    service = start_service("services.agent_svc", redis_url)
    process = service.process
    try:
        port = service.port()
        await wait_serving(port)
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            await make_project(stub)
            watch = stub.WatchAgents(agent_service_pb2.WatchAgentsRequest(project_id="demo"))
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.3)

            process.send_signal(signal.SIGTERM)

            status = await asyncio.wait_for(health.read(), 5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The in-flight stream ends cleanly (OK), not by being cut off.
            assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
        assert await asyncio.to_thread(process.wait, 15) == 0
        output = service.output()
        assert '"event":"shutting down"' in output and '"signal":"SIGTERM"' in output
    finally:
        if process.poll() is None:
            process.kill()


async def test_bad_configuration_exits_with_a_clear_message(redis_url) -> None:
    service = start_service("services.agent_svc", redis_url, LOG_FORMAT="xml")
    assert await asyncio.to_thread(service.wait, 20) == 2
    output = service.output()
    assert "LOG_FORMAT" in output and "Traceback" not in output


async def test_metrics_endpoint_and_one_log_line_per_rpc(redis_url) -> None:
    import httpx

    service = start_service("services.agent_svc", redis_url, METRICS_PORT="auto")
    process = service.process
    try:
        port = service.port()
        assert service.wait_until(
            lambda: any(e.get("event") == "metrics" for e in service.events())
        )
        (metrics,) = [e["port"] for e in service.events() if e.get("event") == "metrics"]
        await wait_serving(port)
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            await make_project(agent_service_pb2_grpc.AgentServiceStub(channel))
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert (
            'agentplane_rpc_total{code="OK",method="/agentplane.agent.v1.AgentService/CreateProject"'
            in text
        )
        assert "agentplane_rpc_duration_seconds_bucket" in text
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
        service.output()
        lines = service.events()
        (rpc,) = [line for line in lines if line.get("event") == "rpc"]
        assert rpc["method"].endswith("/CreateProject") and rpc["code"] == "OK"
        assert rpc["principal"] == "superuser:admin" and rpc["duration_ms"] > 0
        assert len(rpc["trace_id"]) == 32 and len(rpc["span_id"]) == 16 and rpc["peer"]
    finally:
        if process.poll() is None:
            process.kill()
