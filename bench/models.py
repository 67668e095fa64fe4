"""What the model gateway adds to an LLM call (SPEC §19): the same client calls the fake
provider directly and through the gateway, in interleaved rounds so both see the same
machine — sequential non-streaming p50, streaming time to the first event p50, and the
throughput of 64 concurrent streams; the memory an open stream costs is read off the
gateway's RSS with 1,000 streams held open. With `--peers` (`make bench-peers`), the
LiteLLM proxy (installed into .run/litellm, a venv of its own) sits in front of the same
fake provider and is measured the same way in the same rounds.

The client is a minimal keep-alive HTTP/1.1 client, so that the figures are the
gateways', not a client library's. Targets: added p50 ≤ 2 ms (sequential and to the
first event), throughput at least half of direct, and ours at most a quarter of LiteLLM's.

    python -m bench.models [--peers]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.agent.v1 import agent_service_pb2_grpc, api_key_pb2, project_pb2
from bench import stack
from bench.load import channel as channel_to
from scripts.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_MODEL_ROUNDS", "5"))
PER_ROUND = int(os.environ.get("BENCH_MODEL_CALLS", "200"))
CONCURRENT = 64
STREAM_CALLS = 256
BODY = {"model": "gpt-bench", "messages": [{"role": "user", "content": "hello there model"}],
        "max_tokens": 16}  # fmt: skip
LITELLM = ROOT / ".run" / "litellm" / "bin" / "litellm"


class Http:
    """One keep-alive HTTP/1.1 connection; POST a JSON body, read a whole or chunked
    answer; for a stream, the time its first event arrived."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def __aenter__(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, float]:
        """(status, seconds to the first body byte of a stream's first event)."""
        started = time.perf_counter()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"{self.head}content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status = int((await self.reader.readline()).split()[1])
        length, chunked = -1, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value:
                chunked = True
        first = 0.0
        if not chunked:
            await self.reader.readexactly(length)
            return status, time.perf_counter() - started
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if not first and b"data:" in data:
                first = time.perf_counter() - started
            if size == 0:
                return status, first or time.perf_counter() - started


def _process(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def _port_of(process: subprocess.Popen[bytes]) -> int:
    """The port a process logs it listens on (its JSON 'listening' line)."""
    assert process.stdout is not None
    for raw in process.stdout:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "listening":
            port = int(event["port"])
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep it drained
            return port
    raise RuntimeError("the process ended before listening")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _agent_key(agent_address: str) -> str:
    async with channel_to(agent_address) as channel:
        agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        await agents.CreateProject(A.CreateProjectRequest(
            project_id="bench", project=project_pb2.Project(display_name="bench")))  # fmt: skip
        from agentplane.agent.v1 import agent_pb2, agent_type_pb2

        await agents.CreateAgentType(A.CreateAgentTypeRequest(agent_type=agent_type_pb2.AgentType(
            id="bench", display_name="bench", is_active=True)))  # fmt: skip
        agent = await agents.SpawnAgent(A.SpawnAgentRequest(
            project_id="bench",
            agent=agent_pb2.Agent(agent_type_id="bench", name="bench")))  # fmt: skip
        key = await agents.CreateApiKey(
            A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id)
        )
        return key.token


async def _sequential(port: int, headers: dict[str, str], stream: bool) -> list[float]:
    body = orjson.dumps({**BODY, "stream": stream})
    times = []
    async with Http(port, headers) as http:
        for _ in range(PER_ROUND):
            status, seconds = await http.post("/v1/chat/completions", body)
            assert status == 200, status
            times.append(seconds * 1000)
    return times


async def _concurrent(port: int, headers: dict[str, str]) -> float:
    """Streams per second with CONCURRENT clients streaming STREAM_CALLS in all."""
    body = orjson.dumps({**BODY, "stream": True})
    left = iter(range(STREAM_CALLS))

    async def client() -> None:
        async with Http(port, headers) as http:
            for _ in left:
                status, _ = await http.post("/v1/chat/completions", body)
                assert status == 200

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENT)))
    return STREAM_CALLS / (time.perf_counter() - started)


async def _memory_per_stream(gateway_pid: int, gateway_port: int, headers: dict[str, str]) -> float:
    """KB of the gateway's RSS per open stream, 1,000 held open on a slow provider."""
    before = _rss_mb(gateway_pid)
    body = orjson.dumps({**BODY, "model": "slow-bench", "stream": True})
    writers = []
    for _ in range(1000):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\n"
                     "content-type: application/json\r\n"
                     f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        writers.append((reader, writer))
    for reader, _ in writers:
        seen = b""
        while b"data:" not in seen:
            seen += await reader.read(4096)
    held = _rss_mb(gateway_pid)
    for _, writer in writers:
        writer.transport.abort()
    return (held - before) * 1024 / 1000


def _providers(path: Path, fake_port: int, slow_port: int) -> None:
    path.write_text(f"""providers:
  - name: fake
    api: openai
    base_url: http://127.0.0.1:{fake_port}/v1
    api_key_env: BENCH_PROVIDER_KEY
    models: ["gpt-bench"]
    max_output_tokens: 16
  - name: slow
    api: openai
    base_url: http://127.0.0.1:{slow_port}/v1
    api_key_env: BENCH_PROVIDER_KEY
    models: ["slow-bench"]
    max_output_tokens: 16
    timeouts: {{connect: 5s, first_byte: 60s, between_events: 60s}}
""")


def _litellm(
    fake_port: int, folder: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int] | None:
    if not LITELLM.exists():
        return None
    config = folder / "litellm.yaml"
    config.write_text(f"""model_list:
  - model_name: gpt-bench
    litellm_params:
      model: openai/gpt-bench
      api_base: http://127.0.0.1:{fake_port}/v1
      api_key: sk-bench-provider
general_settings:
  master_key: sk-bench-master
litellm_settings:
  drop_params: true
""")
    port = free_port()
    process = subprocess.Popen(
        [str(LITELLM), "--config", str(config), "--port", str(port), "--num_workers", "1"],
        cwd=folder, env={**env, "LITELLM_LOG": "ERROR"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stack._wait_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return process, port


async def _measure(ports: dict[str, int], headers: dict[str, dict[str, str]]) -> dict[str, Any]:
    seq: dict[str, list[float]] = {name: [] for name in ports}
    first: dict[str, list[float]] = {name: [] for name in ports}
    rates: dict[str, list[float]] = {name: [] for name in ports}
    for name, port in ports.items():  # warm-up
        await _sequential(port, headers[name], False)
    for _ in range(ROUNDS):
        for name, port in ports.items():
            seq[name] += await _sequential(port, headers[name], False)
            first[name] += await _sequential(port, headers[name], True)
            rates[name].append(await _concurrent(port, headers[name]))
    p50 = {name: statistics.median(values) for name, values in seq.items()}
    ttft = {name: statistics.median(values) for name, values in first.items()}
    rate = {name: statistics.median(values) for name, values in rates.items()}
    out: dict[str, Any] = {
        "direct": {"p50_ms": p50["direct"], "first_event_p50_ms": ttft["direct"],
                   "streams_per_s_64": rate["direct"]},
    }  # fmt: skip
    for name in ports:
        if name == "direct":
            continue
        out[name] = {
            "p50_ms": p50[name], "added_p50_ms": p50[name] - p50["direct"],
            "first_event_p50_ms": ttft[name], "added_first_event_ms": ttft[name] - ttft["direct"],
            "streams_per_s_64": rate[name], "throughput_vs_direct": rate[name] / rate["direct"],
        }  # fmt: skip
    return out


def model_gateway(peers: bool = False) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ap-bench-models-"))
    env = {**os.environ, "LOG_LEVEL": "warning", "BENCH_PROVIDER_KEY": "sk-bench-provider"}
    fake = _process(
        [sys.executable, "-m", "tests.helpers.fake_provider"], {**env, "FAKE_PIECES": "8"}
    )
    slow = _process([sys.executable, "-m", "tests.helpers.fake_provider"],
                    {**env, "FAKE_PIECES": "40", "FAKE_DELAY_S": "30"})  # fmt: skip
    processes = [fake, slow]
    try:
        fake_port, slow_port = _port_of(fake), _port_of(slow)
        _providers(folder / "providers.yaml", fake_port, slow_port)
        with stack.running() as running:
            token = asyncio.run(_agent_key(running.addresses["agent"]))
            gateway = _process([sys.executable, "-m", "gateway.models"], {
                **env, **{f"{n.upper()}_SVC_ADDR": a for n, a in running.addresses.items()},
                "REDIS_URL": running.redis_url, "AGENTPLANE_ADMIN_TOKEN": stack.BENCH_TOKEN,
                "MODEL_HTTP_PORT": "0", "METRICS_PORT": "0", "LOG_FORMAT": "json",
                "LOG_LEVEL": "info", "LOG_RPC_RATE": "1", "BIND_HOST": "127.0.0.1",
                "MODEL_PROVIDERS_FILE": str(folder / "providers.yaml"),
            })  # fmt: skip
            processes.append(gateway)
            gateway_port = _port_of(gateway)
            ports = {"direct": fake_port, "agentplane": gateway_port}
            headers = {"direct": {"authorization": "Bearer sk-bench-provider"},
                       "agentplane": {"authorization": f"Bearer {token}"}}  # fmt: skip
            litellm = _litellm(fake_port, folder, env) if peers else None
            if litellm is not None:
                processes.append(litellm[0])
                ports["litellm"] = litellm[1]
                headers["litellm"] = {"authorization": "Bearer sk-bench-master"}
            result = asyncio.run(_measure(ports, headers))
            result["agentplane"]["kb_per_open_stream"] = asyncio.run(
                _memory_per_stream(gateway.pid, gateway_port, headers["agentplane"])
            )
            if "litellm" in result:
                result["agentplane_vs_litellm_added"] = (
                    result["agentplane"]["added_p50_ms"] / result["litellm"]["added_p50_ms"]
                )
            elif peers:
                result["litellm"] = "not installed (make bench-peers installs it)"
            return result
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    result = model_gateway(peers="--peers" in sys.argv)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
