"""A real HTTP server on loopback that receives webhook deliveries: it answers each POST
with the next status of a script (then 200), and keeps what it was sent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac


@dataclasses.dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def signatures(self) -> list[str]:
        """The header's signatures: one, or two (`v1=<new>,v1=<old>`) after a rotation."""
        return self.headers["agentplane-signature"].split(",")

    def signed_by(self, secret: str) -> bool:
        """Whether one of the signatures is `secret`'s, as a receiver checks it."""
        timestamp = self.headers["agentplane-timestamp"]
        expected = hmac.new(
            secret.encode(), timestamp.encode() + b"." + self.body, hashlib.sha256
        ).hexdigest()
        return any(hmac.compare_digest(s, "v1=" + expected) for s in self.signatures)


class Receiver:
    def __init__(self, statuses: list[int] | None = None, stall: int = 0) -> None:
        self.statuses = list(statuses or [])
        self.stall = stall  # the first `stall` requests are never answered
        self.release = asyncio.Event()
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/agentplane"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        async with asyncio.timeout(timeout):
            while len(self.deliveries) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.deliveries

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            stalled = len(self.deliveries) < self.stall
            status = 0 if stalled else self.statuses.pop(0) if self.statuses else 200
            self.deliveries.append(Delivery(path, headers, body, status))
            self.arrived.set()
            if stalled:
                await self.release.wait()
                return
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
