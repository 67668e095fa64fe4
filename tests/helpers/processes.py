"""Real service processes for end-to-end tests, each bound to port 0.

A process logs the port it actually bound (`"event": "serving"` for the gRPC services,
`"event": "listening"` for the gateway); `ServiceProcess.port()` reads it back, so no
test ever picks a "free" port that something else may take before it is bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers import ADMIN_TOKEN

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """`python -m <module>` with its stdout read line by line in the background."""

    def __init__(self, module: str, **env: str) -> None:
        self.module = module
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._port = 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env={
                **os.environ,
                "GRPC_PORT": "0",
                "HTTP_PORT": "0",
                "BIND_HOST": "127.0.0.1",
                "METRICS_PORT": "0",
                "SHUTDOWN_GRACE_SECONDS": "5",
                "AGENTPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
                **env,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("{") and not self._ready.is_set():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") in ("serving", "listening"):
                    self._port = int(event["port"])
                    self._ready.set()
        self._ready.set()  # the process ended; port() reports it

    def port(self, timeout: float = 20.0) -> int:
        """The port the process bound, once it says so."""
        if not self._ready.wait(timeout) or not self._port:
            raise AssertionError(f"{self.module} did not start:\n" + "\n".join(self.lines[-30:]))
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port()}"

    def output(self, timeout: float = 10.0) -> str:
        """Everything the process printed (waits for it to end)."""
        self._reader.join(timeout)
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, object]]:
        found = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=5)

    def wait_until(self, predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return False
