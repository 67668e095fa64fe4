"""`make run`'s script: Redis, the three services and the gateway come up on the ports that
RUN_PORT_OFFSET moves (Redis's too), on loopback; one SIGINT (Ctrl-C) stops them all with
exit code 0; and when its Redis dies, make run says so and stops instead of carrying on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import redis as redis_sync

from services.common import registry
from tests.helpers import ADMIN_TOKEN
from tests.helpers.processes import ROOT

BASE_PORTS = [
    registry.REDIS_PORT,
    *(p.port for p in registry.PROCESSES),
    *(p.metrics_port for p in registry.PROCESSES),
]


def _free_offset(start: int) -> int:
    """An offset whose every port is free now. (make run listens on fixed, documented
    ports; if one is taken by the time it starts, the test tries the next offset.)"""
    for offset in range(start, 9000, 97):
        try:
            for port in BASE_PORTS:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return offset
    raise RuntimeError("no free port range")


async def _make_run(offset_start: int):  # type: ignore[no-untyped-def]
    """The real `make run` script with an offset; (process, offset) once the gateway is
    ready."""
    for attempt in range(3):
        offset = _free_offset(offset_start + attempt * 31)
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BIND_HOST")}
        process = subprocess.Popen(  # noqa: ASYNC220 (the real `make run` entry point)
            [sys.executable, "-m", "scripts.run_cluster"],
            cwd=ROOT,
            env={
                **env,
                "RUN_PORT_OFFSET": str(offset),
                # Redis's data starts empty: a second run of the suite in the same
                # checkout must not find the first one's projects.
                "RUN_DIR": tempfile.mkdtemp(prefix="agentplane-run-"),
                "AGENTPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
                "LOG_FORMAT": "json",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{registry.GATEWAY.port + offset}"
        ) as http:
            for _ in range(150):
                if process.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        return process, offset
                await asyncio.sleep(0.2)
        process.kill()
        output = process.communicate()[0].decode()
        if "in use" not in output:
            raise AssertionError(output[-3000:])
    raise AssertionError("make run never came up")


async def test_make_run_starts_everything_and_one_ctrl_c_stops_it() -> None:
    process, offset = await _make_run(3000)
    try:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{registry.GATEWAY.port + offset}", headers=headers
        ) as http:
            organism = await http.get("/api/v1/organism")
            assert organism.status_code == 200 and organism.json()["unavailable_sources"] == []
            await _the_readme_tour(http, offset)
        # Redis moved with the offset, and it holds this cluster's data.
        with redis_sync.Redis(port=registry.REDIS_PORT + offset) as client:
            assert client.ping()
        # Dev processes listen on loopback only.
        own_ip = socket.gethostbyname(socket.gethostname())
        if not own_ip.startswith("127."):
            with socket.socket() as sock:
                sock.settimeout(1)
                assert sock.connect_ex((own_ip, registry.GATEWAY.port + offset)) != 0
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 40) == 0
        output = process.stdout.read().decode()  # type: ignore[union-attr]
        assert "[run] stopped" in output
        assert (
            f"redis://localhost:{registry.REDIS_PORT + offset}/0" in output
        )  # the banner's real ports
        assert f"http://localhost:{registry.GATEWAY.port + offset}" in output
    finally:
        await _stop(process)


async def _the_readme_tour(http: httpx.AsyncClient, offset: int) -> None:
    """The README's five-minute tour: an agent key, then the three-line `openai` example
    against the echo model, and the call's tokens and cost in the usage and the call log."""
    import openai

    assert (
        await http.post("/api/v1/projects", json={"display_name": "Tour", "id": "tour"})
    ).is_success
    kind = {"id": "helper", "display_name": "Helper", "is_active": True}
    assert (await http.post("/api/v1/capabilities", json=kind)).is_success
    agent = (await http.post("/api/v1/projects/tour/agents",
                             json={"agent_type_id": "helper", "name": "first"})).json()  # fmt: skip
    key = (
        await http.post("/api/v1/apiKeys", json={"role": "AGENT", "subject": agent["id"]})
    ).json()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{registry.MODELS.port + offset}/v1", api_key=key["token"]
    )
    answer = await client.chat.completions.create(
        model="echo-1", messages=[{"role": "user", "content": "hello agentplane"}]
    )
    await client.close()
    assert answer.choices[0].message.content == "echo: hello agentplane"
    for _ in range(50):
        usage = (await http.get("/api/v1/usage", params={"project_id": "tour"})).json()
        calls = (await http.get("/api/v1/projects/tour/calls")).json()
        if calls.get("calls"):
            break
        await asyncio.sleep(0.1)
    totals = usage["usage"]["totals"]
    assert int(totals["total_tokens"]) == answer.usage.total_tokens and totals["total_cost_micros"]
    assert calls["calls"][0]["model_requested"] == "echo-1"


def _is_zombie(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop `make run` as Ctrl-C does (it stops its children), killing it only if that
    fails — a failed test must not leave a cluster running."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]


async def test_a_killed_make_run_takes_its_cluster_with_it() -> None:
    """SIGKILL gives `make run` no chance to stop anything: its children (Redis, the
    services, both gateways) stop on their own instead of holding the ports."""
    process, _offset = await _make_run(7000)
    try:
        children = _children(process.pid)
        assert len(children) == 1 + len(registry.PROCESSES), children
        process.kill()
        process.wait()
        for _ in range(100):
            alive = await asyncio.to_thread(_running, children)
            if not alive:
                break
            await asyncio.sleep(0.2)
        assert not alive, f"left running after make run was killed: {alive}"
    finally:
        await _stop(process)


async def test_make_run_notices_when_its_redis_dies() -> None:
    process, offset = await _make_run(5000)
    try:
        with redis_sync.Redis(port=registry.REDIS_PORT + offset) as client:
            pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        code = await asyncio.to_thread(process.wait, 40)
        output = process.stdout.read().decode()  # type: ignore[union-attr]
        assert code == 1, output[-2000:]
        assert "[run] redis-server exited" in output and "[run] stopped" in output
        assert not await asyncio.to_thread(_is_zombie, pid)
    finally:
        await _stop(process)
