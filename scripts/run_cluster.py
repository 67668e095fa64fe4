"""`make run`: Redis, the three services, the gateway and the model gateway, in the
foreground.

Logs of all processes go to this terminal; one Ctrl-C (or SIGTERM) stops them all
cleanly, services first and Redis last. An already-running Redis at REDIS_URL is reused.
RUN_PORT_OFFSET moves every port, Redis's included (to run a second cluster beside the
first); RUN_DIR moves Redis's data and log (default .run/); everything listens on
loopback unless BIND_HOST says otherwise. If any process ends — the Redis it started
included — the rest are stopped and the exit code is 1.
"""

from __future__ import annotations

import ctypes
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
from services.common import registry

ROOT = Path(__file__).resolve().parent.parent
# Redis's data and log (RUN_DIR moves them: the tests start from an empty one).
RUN_DIR = Path(os.environ.get("RUN_DIR") or ROOT / ".run")
# RUN_PORT_OFFSET moves every port at once (to run a second cluster beside the first).
OFFSET = int(os.environ.get("RUN_PORT_OFFSET", "0"))
REDIS_URL = os.environ.get("REDIS_URL", f"redis://localhost:{registry.REDIS_PORT + OFFSET}/0")
BIND_HOST = os.environ.get("BIND_HOST", "127.0.0.1")


def _ports(process: registry.Process) -> dict[str, int]:
    port_variable = {registry.GATEWAY: "HTTP_PORT", registry.MODELS: "MODEL_HTTP_PORT"}.get(
        process, "GRPC_PORT"
    )
    return {port_variable: process.port + OFFSET, "METRICS_PORT": process.metrics_port + OFFSET}


PROCESSES = [(p.name, p.module, _ports(p)) for p in registry.PROCESSES]
PEERS = {s.address_env: f"localhost:{s.port + OFFSET}" for s in registry.SERVICES}


def die_with_parent() -> None:
    """In a child, before it runs: SIGTERM it when `make run` dies, however it dies (a
    SIGKILL included), so no process is left holding the cluster's ports (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). Safe here: `make run` starts its children from
    its only thread."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _model_gateway() -> str:
    """The addresses an agent on this machine uses to reach `make run`'s model gateway."""
    port = registry.MODELS.port + OFFSET
    return ",".join(f"{host}:{port}" for host in ("localhost", "127.0.0.1", BIND_HOST))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


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
        elif "MODEL_HTTP_PORT" in ports:
            where = f"http://{host}:{ports['MODEL_HTTP_PORT']}/v1   (OpenAI and Anthropic SDKs)"
        else:
            where = f"http://{host}:{ports['HTTP_PORT']}   console http://{host}:{ports['HTTP_PORT']}/ui/"
        rows.append(f"  {name:<9} {where}   (metrics :{ports['METRICS_PORT']})")
    agent = PROCESSES[0][2]["GRPC_PORT"]
    return "\n".join(
        [f"[run] listening on {BIND_HOST} (RUN_PORT_OFFSET={OFFSET}):", *rows,
         f"[run] try: grpcurl -plaintext {host}:{agent} list   — Ctrl-C stops everything"]
    )  # fmt: skip


Child = tuple[str, subprocess.Popen[bytes]]


def start_redis(redis_url: str) -> RedisProcess | None:
    """A redis-server for REDIS_URL's port, unless a Redis already answers there."""
    parsed = urlparse(redis_url)
    port = parsed.port or registry.REDIS_PORT
    if _port_open(parsed.hostname or "localhost", port):
        print(f"[run] using the Redis already at {redis_url}")
        return None
    redis = RedisProcess(
        port=port,
        data_dir=str(RUN_DIR / f"redis-{port}"),
        extra_args=["--appendonly", "yes", "--appendfsync", "everysec"],
        log_file=str(RUN_DIR / f"redis-{port}.log"),
        preexec=die_with_parent,
    ).start()
    print(f"[run] redis-server on {redis.url} (data and log in .run/)")
    return redis


def start_processes(redis_url: str) -> list[Child]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
        "AGENTPLANE_ADMIN_TOKEN": admin_token(),
        "BIND_HOST": BIND_HOST,
        # A developer's webhook receiver is usually plain HTTP on this machine.
        "WEBHOOK_ALLOW_HTTP": os.environ.get("WEBHOOK_ALLOW_HTTP", "true"),
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": os.environ.get("WEBHOOK_ALLOW_PRIVATE_NETWORKS", "true"),
        # The model gateway's providers: the built-in echo model unless told otherwise.
        "MODEL_PROVIDERS_FILE": os.environ.get(
            "MODEL_PROVIDERS_FILE", str(ROOT / "examples" / "providers.yaml")
        ),
        # OTLP spans of calls sent to this model gateway are not counted twice.
        "MODEL_GATEWAY_ADDRESSES": os.environ.get("MODEL_GATEWAY_ADDRESSES", _model_gateway()),
        **PEERS,
    }
    children: list[Child] = []
    for name, module, overrides in PROCESSES:
        ports = {k: str(v) for k, v in overrides.items()}
        command = [sys.executable, "-m", module]
        child = subprocess.Popen(
            command, cwd=ROOT, env={**env, **ports}, preexec_fn=die_with_parent
        )
        children.append((name, child))
    return children


def wait_for_stop(watched: list[Child]) -> int:
    """Until Ctrl-C/SIGTERM (0) or until any watched process ends (1)."""
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for name, child in watched:
            if child.poll() is not None:  # (poll also reaps it: no zombie is left)
                print(f"[run] {name} exited with {child.returncode}; stopping the rest")
                return 1
        time.sleep(0.2)
    return 0


def stop_processes(children: list[Child]) -> None:
    for _name, child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for name, child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"[run] {name} did not stop in time; killing it")
            child.kill()


def main() -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    redis = start_redis(REDIS_URL)
    children = start_processes(REDIS_URL)
    print(banner(REDIS_URL, [name for name, _ in children]))
    watched = list(children)
    if redis is not None and redis.process is not None:
        watched.append(("redis-server", redis.process))
    exit_code = wait_for_stop(watched)
    stop_processes(children)
    if redis is not None:
        redis.stop()
    print("[run] stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
