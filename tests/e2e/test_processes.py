"""The real `python -m services.agent_svc` process: serving, reflection, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc
from scripts.redis_server import free_port
from tests.helpers import ADMIN_TOKEN, authed_channel, make_project

ROOT = Path(__file__).resolve().parents[2]


def start_service(module: str, port: int, redis_url: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={
            **os.environ,
            "GRPC_PORT": str(port),
            "METRICS_PORT": "0",
            "REDIS_URL": redis_url,
            "SHUTDOWN_GRACE_SECONDS": "5",
            "AGENTPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def wait_serving(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with authed_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"service on {port} never became SERVING")


@pytest.mark.parametrize("module", ["services.usage_svc", "services.thread_svc"])
async def test_every_service_drains_on_sigterm(redis_url, module) -> None:
    port = free_port()
    process = start_service(module, port, redis_url)
    try:
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
    port = free_port()
    process = start_service("services.agent_svc", port, redis_url)
    try:
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
        output = process.stdout.read().decode()  # type: ignore[union-attr]
        assert '"event":"shutting down"' in output and '"signal":"SIGTERM"' in output
    finally:
        if process.poll() is None:
            process.kill()


async def test_bad_configuration_exits_with_a_clear_message(redis_url) -> None:
    process = start_service("services.agent_svc", free_port(), redis_url, LOG_FORMAT="xml")
    assert await asyncio.to_thread(process.wait, 20) == 2
    output = process.stdout.read().decode()  # type: ignore[union-attr]
    assert "LOG_FORMAT" in output and "Traceback" not in output


async def test_metrics_endpoint_and_one_log_line_per_rpc(redis_url) -> None:
    import httpx

    port, metrics = free_port(), free_port()
    process = start_service("services.agent_svc", port, redis_url, METRICS_PORT=str(metrics))
    try:
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
        lines = [
            json.loads(line)
            for line in process.stdout.read().decode().splitlines()
            if line.startswith("{")
        ]  # type: ignore[union-attr]
        (rpc,) = [line for line in lines if line.get("event") == "rpc"]
        assert rpc["method"].endswith("/CreateProject") and rpc["code"] == "OK"
        assert rpc["principal"] == "superuser:admin" and rpc["duration_ms"] > 0
        assert len(rpc["trace_id"]) == 32 and len(rpc["span_id"]) == 16 and rpc["peer"]
    finally:
        if process.poll() is None:
            process.kill()
