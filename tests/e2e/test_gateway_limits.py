"""The gateway process as an attacker meets it: huge uploads without a token, huge declared
bodies, chunked bodies past the limit, connections that never finish their request, more
connections than it allows. Memory stays flat and nothing is held open for long."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.helpers import ADMIN_TOKEN
from tests.helpers.processes import ServiceProcess

MB = 1024 * 1024


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def gateway() -> Iterator[ServiceProcess]:
    # Backends on a closed port: nothing here gets past the gateway's own checks.
    process = ServiceProcess(
        "gateway",
        AGENT_SVC_ADDR="127.0.0.1:1",
        THREAD_SVC_ADDR="127.0.0.1:1",
        USAGE_SVC_ADDR="127.0.0.1:1",
        HTTP_READ_TIMEOUT_SECONDS="1",
        HTTP_MAX_CONNECTIONS="50",
    )
    process.port()
    yield process
    assert process.stop() == 0


def upload(port: int, headers: str, total: int, chunked: bool) -> bytes:
    """Send a request head, then up to `total` body bytes (as fast as the server takes
    them, stopping when it closes); return what the server answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(headers.encode())
        block = b"x" * MB
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
        sent = 0
        try:
            while sent < total:
                sock.sendall(frame)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer
    finally:
        sock.close()


def test_uploads_without_a_token_or_past_the_limit_leave_memory_flat(gateway) -> None:
    port, pid = gateway.port(), gateway.process.pid
    before = peak_rss_mb(pid)
    head = "POST /api/v1/projects HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    # 300 MB chunked, no token: refused before the body is read.
    answer = upload(port, head + "Transfer-Encoding: chunked\r\n\r\n", 300 * MB, chunked=True)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # A declared Content-Length past the limit, with a valid token: 413 at once.
    authed = head + f"authorization: Bearer {ADMIN_TOKEN}\r\n"
    answer = upload(port, authed + f"Content-Length: {300 * MB}\r\n\r\n", 300 * MB, chunked=False)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Chunked with a valid token: counted while streaming, stopped at the limit.
    answer = upload(port, authed + "Transfer-Encoding: chunked\r\n\r\n", 300 * MB, chunked=True)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    grown = peak_rss_mb(pid) - before
    assert grown < 40, f"peak RSS grew by {grown:.0f} MB"


def test_an_oversized_authorization_header_is_401_not_429(gateway) -> None:
    sock = socket.create_connection(("127.0.0.1", gateway.port()), timeout=10)
    with sock:
        sock.sendall(
            b"GET /api/v1/organism HTTP/1.1\r\nHost: x\r\nauthorization: Bearer "
            + b"a" * 100_000
            + b"\r\n\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"retry-after" not in answer.lower()


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError, BlockingIOError):
        return False


def test_requests_that_never_finish_are_closed_and_connections_are_bounded(gateway) -> None:
    port = gateway.port()
    slow = []
    for i in range(40):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        # Half of them never finish their headers, half never finish their body.
        if i % 2:
            sock.sendall(b"GET /api/v1/organism HTTP/1.1\r\nHost: x\r\n")
        else:
            sock.sendall(
                b"POST /api/v1/projects HTTP/1.1\r\nHost: x\r\n"
                + f"authorization: Bearer {ADMIN_TOKEN}\r\n".encode()
                + b"Content-Length: 100\r\n\r\n{"
            )
        slow.append(sock)
    # Past the cap (50), new connections are closed at once.
    extra = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    time.sleep(0.3)
    for sock in extra:
        sock.settimeout(2)
    refused = sum(_closed_by_peer(sock) for sock in extra)
    assert refused >= 10, f"only {refused} of 20 connections past the cap were closed"
    # Within the read timeout (1 s here) and a little slack, every slow request is gone.
    started = time.monotonic()
    for sock in slow:
        sock.settimeout(5)
        assert _closed_by_peer(sock), "a request that never finished was kept open"
    assert time.monotonic() - started < 5
    for sock in slow + extra:
        sock.close()
    # And the gateway still serves.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
