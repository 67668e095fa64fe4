"""The gateway's HTTP server: uvicorn (httptools), with the limits a public port needs.

uvicorn bounds idle keep-alive connections but not a request that never finishes
arriving: a client may trickle its headers or body forever and hold the connection. Here
every request must be read completely within HTTP_READ_TIMEOUT_SECONDS of its first byte
(or of the connection's opening), or the connection is closed; and past
HTTP_MAX_CONNECTIONS open connections a new one is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.common.logging import get_logger
from services.common.settings import Settings

log = get_logger("agentplane.gateway")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CoalescingTransport:
    """A transport whose writes of one event-loop turn leave in one send: uvicorn writes a
    response's head and its body separately, which costs a second system call and often a
    second packet the client waits for. Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BoundedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a whole-request read deadline, a connection cap, and a
    response's writes coalesced (CoalescingTransport)."""

    read_timeout_s = 30.0
    max_connections = 2048

    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("too many connections; closing a new one", limit=self.max_connections)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:
            self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the handler sees a disconnect, not more body
            self.cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request is the keep-alive timeout's business until its
        # first byte arrives (on_message_begin arms the read deadline again).


async def lifespan(
    receive: Any, send: Any, start: Callable[[], Awaitable[None]],
    stop: Callable[[], Awaitable[None]],
) -> None:  # fmt: skip
    """An ASGI app's lifespan: `start` before the first request, `stop` at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


def protocol_for(settings: Settings) -> type[BoundedHttpProtocol]:
    return type(
        "GatewayHttpProtocol",
        (BoundedHttpProtocol,),
        {
            "read_timeout_s": settings.http_read_timeout_s,
            "max_connections": settings.http_max_connections,
        },
    )


def listen(settings: Settings, port: int | None = None) -> socket.socket:
    """The gateway's listening socket (port 0: any free port; read it back from the socket)."""
    host = settings.bind_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, settings.http_port if port is None else port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT that stopped it cleanly is not raised
    again afterwards: like the services, the gateway exits 0 after a graceful stop; and
    that an app's endless event streams are ended when the stop begins (`end_streams`),
    so they do not hold it for the whole grace period. (The model gateway's streams are
    calls being paid for: they get the grace period to finish.)"""

    def __init__(self, config: uvicorn.Config, end_streams: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._end_streams = end_streams

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._end_streams is not None:
            self._end_streams()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(settings: Settings, app: Any) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # the gateway writes its own access line, with the trace id
        proxy_headers=False,  # nothing here reads the client's address
        loop="uvloop",
        http=protocol_for(settings),
        lifespan="on",
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.grace_period_s),
    )
    return GatewayServer(config, getattr(app, "end_streams", None))
