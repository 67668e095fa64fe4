"""`make profile`: where one RecordUsage spends its CPU in the usage-service process.

Starts the services as processes, drives RecordUsage (32 in flight, through the SDK
client, each record settling nothing: no reservation) while py-spy samples the usage
service's thread holding the GIL (its Python CPU time), and prints the top functions by
own time and the share of each layer (grpc, the chassis, redis-py, the store, logging,
tracing). Figures in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agentplane.client import AgentplaneClient
from agentplane.usage.v1 import usage_service_pb2 as U
from bench import stack
from bench.load import BENCH_TOKEN

SECONDS = 12
IN_FLIGHT = 32
LAYERS = [  # first match wins, on the sampled frame's file path
    ("redis-py", "(redis/"), ("gRPC", "(grpc/"), ("structlog / logging", "(structlog/"),
    ("structlog / logging", "(logging/"), ("OpenTelemetry", "(opentelemetry/"),
    ("OpenTelemetry", "(trace/"), ("OpenTelemetry", "_decorator.py"),
    ("protobuf", "(google/"), ("chassis (services/common)", "(services/common/"),
    ("usage service", "(services/usage_svc/"), ("asyncio / uvloop", "(asyncio/"),
    ("asyncio / uvloop", "(uvloop/"),
]  # fmt: skip


async def drive(address: str, seconds: float) -> int:
    done = 0
    async with AgentplaneClient(token=BENCH_TOKEN, usage_addr=address) as client:
        deadline = time.monotonic() + seconds

        async def lane(lane_no: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < deadline:
                request = U.RecordUsageRequest(
                    usage_id=f"p{lane_no}-{n}", thread_id=f"t{n % 64}", agent_id=f"a{lane_no}",
                    project_id="bench", model="gpt-4o", prompt_tokens=100, completion_tokens=20,
                )  # fmt: skip
                await client.call(client.usage_service.RecordUsage, request)
                n += 1
                done += 1

        await asyncio.gather(*(lane(i) for i in range(IN_FLIGHT)))
    return done


def layer_of(frame: str) -> str:
    return next((name for name, mark in LAYERS if mark in frame), "other")


def summarize(raw: Path) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        leaf = frames[-1]
        own[leaf] += count
        for frame in set(frames):
            if "(services/" in frame or "(agentplane/" in frame:
                function, _, where = frame.partition(" (")
                inclusive[f"{function} ({where.split(':')[0]})"] += count
        layers[layer_of(leaf)] += count
        total += count
    return {
        "samples": total,
        "layers": [(name, round(100 * n / total, 1)) for name, n in layers.most_common()],
        "top": [(frame, round(100 * n / total, 1)) for frame, n in own.most_common(25)],
        "inclusive": [(frame, round(100 * n / total, 1)) for frame, n in inclusive.most_common(25)],
    }


def main() -> int:
    with stack.running() as running, tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "usage.txt"
        spy = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
             str(running.pids["usage"]), "--duration", str(SECONDS), "--rate", "250",
             "--format", "raw", "--output", str(raw), "--nonblocking", "--gil"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        calls = asyncio.run(drive(running.addresses["usage"], SECONDS - 1))
        spy.wait(timeout=60)
        result = summarize(raw)
    print(f"RecordUsage: {calls} calls in {SECONDS - 1} s ({calls / (SECONDS - 1):.0f}/s), "
          f"{result['samples']} samples of the usage-service process\n")  # fmt: skip
    print("share of CPU samples by layer (own time of the sampled frame):")
    for name, share in result["layers"]:
        print(f"  {share:5.1f}%  {name}")
    print("\ntop functions by own time:")
    for frame, share in result["top"]:
        print(f"  {share:5.1f}%  {frame}")
    print("\nthe service's own functions by inclusive time (with what they call):")
    for frame, share in result["inclusive"]:
        print(f"  {share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
