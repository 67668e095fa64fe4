"""The gateway's added latency: the same read through REST and straight over gRPC."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc, project_pb2
from bench.load import BENCH_TOKEN
from bench.load import channel as channel_to
from scripts.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = int(os.environ.get("BENCH_GATEWAY_SAMPLES", "1000"))


async def _wait_http(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("gateway did not start")


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client, so the figure is the gateway's, not the
    client library's (httpx alone costs about as much as the whole gRPC call)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def __aenter__(self) -> RawHttp:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def get(self, path: str) -> tuple[int, bytes]:
        request = f"GET {path} HTTP/1.1\r\nhost: {self.host}\r\n{self.head}\r\n"
        self.writer.write(request.encode())
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)


async def _measure(grpc_target: str, http_url: str) -> dict[str, float]:
    async with channel_to(grpc_target) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        for _ in range(100):
            try:
                await stub.CreateProject(
                    agent_service_pb2.CreateProjectRequest(
                        project=project_pb2.Project(display_name="Bench"), project_id="bench"
                    ),
                    timeout=1,
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    break
                await asyncio.sleep(0.1)
        request = agent_service_pb2.GetProjectRequest(project_id="bench")
        direct: list[float] = []
        via: list[float] = []
        via_httpx: list[float] = []
        headers = {"authorization": f"Bearer {BENCH_TOKEN}"}
        host, port = http_url.removeprefix("http://").split(":")
        async with (
            httpx.AsyncClient(base_url=http_url, headers=headers) as client,
            RawHttp(host, int(port), headers) as raw,
        ):
            for _ in range(100):  # warm every path
                await stub.GetProject(request)
                await client.get("/api/v1/projects/bench")
                await raw.get("/api/v1/projects/bench")
            for _ in range(SAMPLES):  # interleaved, so drift hits all alike
                began = time.perf_counter()
                await stub.GetProject(request)
                direct.append(time.perf_counter() - began)
                began = time.perf_counter()
                status, body = await raw.get("/api/v1/projects/bench")
                via.append(time.perf_counter() - began)
                assert status == 200, body
                began = time.perf_counter()
                await client.get("/api/v1/projects/bench")
                via_httpx.append(time.perf_counter() - began)
    grpc_ms = statistics.median(direct) * 1000
    rest_ms = statistics.median(via) * 1000
    return {
        "grpc_p50_ms": grpc_ms,
        "gateway_p50_ms": rest_ms,
        "gateway_httpx_client_p50_ms": statistics.median(via_httpx) * 1000,
        "added_fraction": rest_ms / grpc_ms - 1,
    }


def measure_gateway(redis_url: str) -> dict[str, Any]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "METRICS_PORT": "0",
        "AGENT_SVC_ADDR": f"127.0.0.1:{grpc_port}",
        "AGENTPLANE_ADMIN_TOKEN": BENCH_TOKEN,
    }
    agent = subprocess.Popen(
        [sys.executable, "-m", "services.agent_svc"], cwd=ROOT,
        env={**env, "GRPC_PORT": str(grpc_port)}, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env={**env, "HTTP_PORT": str(http_port)},
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{http_port}"
        asyncio.run(_wait_http(url))
        return asyncio.run(_measure(f"127.0.0.1:{grpc_port}", url))
    finally:
        for process in (gateway, agent):
            process.terminate()
            process.wait(timeout=20)
