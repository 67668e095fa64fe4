"""`make run`: Redis, every service that exists and the gateway, in the foreground.

Logs of all processes go to this terminal; one Ctrl-C (or SIGTERM) stops them all
cleanly, services first and Redis last. An already-running Redis at REDIS_URL is reused.
RUN_PORT_OFFSET moves every port, Redis's included (to run a second cluster beside the
first); everything listens on loopback unless BIND_HOST says otherwise. If any process
ends — the Redis it started included — the rest are stopped and the exit code is 1.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from scripts.redis_server import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
# RUN_PORT_OFFSET moves every port at once (to run a second cluster beside the first).
OFFSET = int(os.environ.get("RUN_PORT_OFFSET", "0"))
PROCESSES = [
    ("agent", "services.agent_svc", {"GRPC_PORT": 50051 + OFFSET, "METRICS_PORT": 9101 + OFFSET}),
    ("thread", "services.thread_svc", {"GRPC_PORT": 50052 + OFFSET, "METRICS_PORT": 9102 + OFFSET}),
    ("usage", "services.usage_svc", {"GRPC_PORT": 50053 + OFFSET, "METRICS_PORT": 9103 + OFFSET}),
    ("gateway", "gateway", {"HTTP_PORT": 8080 + OFFSET, "METRICS_PORT": 9104 + OFFSET}),
]
REDIS_URL = os.environ.get("REDIS_URL", f"redis://localhost:{6379 + OFFSET}/0")
BIND_HOST = os.environ.get("BIND_HOST", "127.0.0.1")
PEERS = {
    "AGENT_SVC_ADDR": f"localhost:{50051 + OFFSET}",
    "THREAD_SVC_ADDR": f"localhost:{50052 + OFFSET}",
    "USAGE_SVC_ADDR": f"localhost:{50053 + OFFSET}",
}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _module_exists(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__main__.py").exists()


def admin_token() -> str:
    """AGENTPLANE_ADMIN_TOKEN, or one generated on first use and kept in .admin-token
    (ignored by git), printed once so the operator can use it."""
    given = os.environ.get("AGENTPLANE_ADMIN_TOKEN", "")
    if given:
        return given
    path = ROOT / ".admin-token"
    if path.exists():
        print(
            "[run] superuser token: in .admin-token (export AGENTPLANE_ADMIN_TOKEN to choose one)"
        )
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.write_text(token + "\n")
    path.chmod(0o600)
    print(f"[run] generated a superuser token (kept in .admin-token): {token}")
    return token


def banner(redis_url: str, started: list[str]) -> str:
    """Where everything listens, with the ports actually used."""
    host = "localhost" if BIND_HOST in ("127.0.0.1", "::1", "localhost") else BIND_HOST
    rows = [f"  redis     {redis_url}"]
    for name, _module, ports in PROCESSES:
        if name not in started:
            continue
        if "GRPC_PORT" in ports:
            where = f"grpc {host}:{ports['GRPC_PORT']}"
        else:
            where = f"http://{host}:{ports['HTTP_PORT']}"
        rows.append(f"  {name:<9} {where}   (metrics :{ports['METRICS_PORT']})")
    agent = PROCESSES[0][2]["GRPC_PORT"]
    return "\n".join(
        [f"[run] listening on {BIND_HOST} (RUN_PORT_OFFSET={OFFSET}):", *rows,
         f"[run] try: grpcurl -plaintext {host}:{agent} list   — Ctrl-C stops everything"]
    )  # fmt: skip


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    redis_url = REDIS_URL
    parsed = urlparse(redis_url)
    redis: RedisProcess | None = None
    if not _port_open(parsed.hostname or "localhost", parsed.port or 6379):
        redis = RedisProcess(
            port=parsed.port or 6379,
            data_dir=str(RUN_DIR / f"redis-{parsed.port or 6379}"),
            extra_args=["--appendonly", "yes", "--appendfsync", "everysec"],
            log_file=str(RUN_DIR / f"redis-{parsed.port or 6379}.log"),
        ).start()
        print(f"[run] redis-server on {redis.url} (data and log in .run/)")
    else:
        print(f"[run] using the Redis already at {redis_url}")

    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
        "AGENTPLANE_ADMIN_TOKEN": admin_token(),
        "BIND_HOST": BIND_HOST,
        **PEERS,
    }
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, module, overrides in PROCESSES:
        if not _module_exists(module):
            continue
        children.append(
            (
                name,
                subprocess.Popen(
                    [sys.executable, "-m", module],
                    cwd=ROOT,
                    env={**env, **{k: str(v) for k, v in overrides.items()}},
                ),
            )
        )
    print(banner(redis_url, [name for name, _ in children]))

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    watched = list(children)
    if redis is not None and redis.process is not None:
        watched.append(("redis-server", redis.process))
    while not stopping:
        for name, child in watched:
            if child.poll() is not None:  # (poll also reaps it: no zombie is left)
                print(f"[run] {name} exited with {child.returncode}; stopping the rest")
                exit_code, stopping = 1, True
                break
        time.sleep(0.2)

    for _name, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for name, child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"[run] {name} did not stop in time; killing it")
            child.kill()
    if redis is not None:
        redis.stop()
    print("[run] stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
