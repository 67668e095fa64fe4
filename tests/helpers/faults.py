"""Fault injection on loopback: a TCP proxy that can lose one Redis reply."""

from __future__ import annotations

import asyncio
import contextlib


class LosingProxy:
    """Forwards TCP to an upstream; when armed, it drops the reply to the next request
    containing `marker` — after the upstream applied it — and cuts that connection."""

    def __init__(self, upstream_port: int, marker: bytes = b"EVALSHA") -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.armed = False
        self.dropped = 0
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> LosingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        state = {"doomed": False}

        async def client_to_upstream() -> None:
            while data := await reader.read(65536):
                if self.armed and self.marker in data:
                    self.armed = False
                    state["doomed"] = True
                up_writer.write(data)
                await up_writer.drain()

        async def upstream_to_client() -> None:
            while data := await up_reader.read(65536):
                if state["doomed"]:
                    self.dropped += 1
                    break  # the reply is lost on its way back
                writer.write(data)
                await writer.drain()

        tasks = [
            asyncio.create_task(client_to_upstream()),
            asyncio.create_task(upstream_to_client()),
        ]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for stream in (writer, up_writer):
            stream.close()
