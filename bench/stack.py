"""A whole agentplane for a bench run: a real redis-server and the three services as real
processes on unix sockets (and, when asked, the gateway on a free port)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import BENCH_TOKEN, wait_serving
from scripts.redis_server import RedisProcess, free_port
from services.common import registry

ROOT = Path(__file__).resolve().parent.parent
UNLIMITED = ",".join(f"{m}=100000000/min" for m in (
    "default_read", "default_write", "PostMessage", "CreateThread", "CompleteThread",
    "SpawnAgent"))  # fmt: skip


@dataclass
class Stack:
    redis_url: str
    addresses: dict[str, str]  # service name -> gRPC address
    gateway_url: str = ""
    pids: dict[str, int] = field(default_factory=dict)  # service name -> process id


def _start(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )


@contextlib.contextmanager
def running(env: dict[str, str] | None = None, gateway: bool = False) -> Iterator[Stack]:
    redis = RedisProcess(log_file=None).start()
    folder = tempfile.mkdtemp(prefix="ap-bench-")
    addresses = {s.name: f"unix:{folder}/{s.name}.sock" for s in registry.SERVICES}
    base = {
        **os.environ, "REDIS_URL": redis.url, "METRICS_PORT": "0",
        "AGENTPLANE_ADMIN_TOKEN": BENCH_TOKEN, "LOG_LEVEL": "warning", "RATE_LIMITS": UNLIMITED,
        **{s.address_env: addresses[s.name] for s in registry.SERVICES}, **(env or {}),
    }  # fmt: skip
    procs = [
        _start(f"services.{s.name}_svc", {**base, "GRPC_ADDRESS": addresses[s.name]})
        for s in registry.SERVICES
    ]

    stack = Stack(redis.url, addresses)
    stack.pids = {s.name: p.pid for s, p in zip(registry.SERVICES, procs, strict=True)}
    try:
        if gateway:
            port = free_port()
            procs.append(_start("gateway", {**base, "HTTP_PORT": str(port),
                                            "BIND_HOST": "127.0.0.1"}))  # fmt: skip
            stack.gateway_url = f"http://127.0.0.1:{port}"
        for s in registry.SERVICES:
            asyncio.run(wait_serving(addresses[s.name]))
        if gateway:
            _wait_http(stack.gateway_url + "/healthz")
        yield stack
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)
        redis.stop()


def _wait_http(url: str, timeout: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")
