"""`make run`'s script: Redis, the three services and the gateway come up and answer,
and one SIGINT (Ctrl-C) stops them all with exit code 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import httpx

from scripts.redis_server import free_port
from tests.e2e.test_processes import ROOT
from tests.helpers import ADMIN_TOKEN


def _free_offset() -> int:
    import socket

    for offset in range(3000, 9000, 97):
        ports = [50051 + offset, 50052 + offset, 50053 + offset, 8080 + offset]
        ports += [9101 + offset, 9102 + offset, 9103 + offset, 9104 + offset]
        try:
            for port in ports:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return offset
    raise RuntimeError("no free port range")


async def test_make_run_starts_everything_and_one_ctrl_c_stops_it(tmp_path) -> None:
    offset = _free_offset()
    redis_port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 (the real `make run` entry point)
        [sys.executable, "-m", "scripts.run_cluster"],
        cwd=ROOT,
        env={
            **os.environ,
            "RUN_PORT_OFFSET": str(offset),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AGENTPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_FORMAT": "json",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{8080 + offset}"
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as http:
            ready = None
            for _ in range(150):
                with contextlib.suppress(httpx.HTTPError):
                    ready = await http.get("/readyz")
                    if ready.status_code == 200:
                        break
                await asyncio.sleep(0.2)
            assert ready is not None and ready.status_code == 200, ready and ready.text
            organism = await http.get("/api/v1/organism")
            assert organism.status_code == 200 and organism.json()["unavailable_sources"] == []
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 40) == 0
        output = process.stdout.read().decode()  # type: ignore[union-attr]
        assert "[run] stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
