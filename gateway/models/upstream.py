"""Forwarding to a provider: one pooled HTTP client per provider, its timeouts, and the
answer's server-sent events split as they arrive (never buffered past an event).

The caller's credentials never go upstream: the request carries the provider's key and
only the headers a provider needs (content type, Anthropic's version and beta flags). A
request is sent again only when the connection failed before it was sent (connect
errors); once sent, it is not, since the provider may already be generating and billing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping

import httpx

from gateway.models.providers import Provider
from gateway.models.wire import ANTHROPIC, CHAT, EMBEDDINGS, MESSAGES, RESPONSES

PATHS = {
    CHAT: "/chat/completions", RESPONSES: "/responses", EMBEDDINGS: "/embeddings",
    MESSAGES: "/v1/messages",
}  # fmt: skip
ANTHROPIC_VERSION = "2023-06-01"
PASSED_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta")
CONNECT_ATTEMPTS = 2
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a non-streamed answer read whole, at most


class UpstreamTimeout(Exception):
    """The provider did not answer in time: `stage` is connect, first_byte or between_events."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the provider did not answer in time ({stage})")
        self.stage = stage


class UpstreamFailed(Exception):
    """The connection to the provider failed; `sent` says whether the request had left."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class Upstream:
    def __init__(self, provider: Provider, max_connections: int = 1024) -> None:
        self.provider = provider
        timeouts = provider.timeouts
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=30.0, pool=30.0),
            # A request's head and body leave as two writes: without TCP_NODELAY the body
            # waits for the provider's delayed ACK (40 ms on Linux) on every call.
            transport=httpx.AsyncHTTPTransport(
                limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            ),
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def _headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
        }
        for name in PASSED_HEADERS:
            if name in client_headers:
                headers[name] = client_headers[name]
        key = self.provider.api_key
        if self.provider.api == ANTHROPIC:
            headers.setdefault("anthropic-version", ANTHROPIC_VERSION)
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def open(
        self, operation: str, body: bytes, client_headers: Mapping[str, str]
    ) -> httpx.Response:
        """Send the request; the answer's status and headers, its body still to read."""
        request = self._client.build_request(
            "POST", self.provider.base_url + PATHS[operation], content=body,
            headers=self._headers(client_headers),
        )  # fmt: skip
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                async with asyncio.timeout(self.provider.timeouts.first_byte):
                    return await self._client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt + 1 == CONNECT_ATTEMPTS:  # never sent: safe to try again once
                    if isinstance(exc, httpx.ConnectTimeout):
                        raise UpstreamTimeout("connect") from None
                    raise UpstreamFailed(f"cannot connect to the provider: {exc}", False) from None
            except TimeoutError:
                raise UpstreamTimeout("first_byte") from None
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"the provider's connection failed: {exc!r}", True) from None
        raise AssertionError("unreachable")

    async def read_all(self, response: httpx.Response) -> bytes:
        """A whole (non-streamed) answer, within the between-events timeout per read."""
        chunks, size = [], 0
        async for chunk in self.chunks(response):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise UpstreamFailed("the provider's answer is too large", True)
            chunks.append(chunk)
        return b"".join(chunks)

    async def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        stream = response.aiter_raw()
        limit = self.provider.timeouts.between_events
        while True:
            try:
                async with asyncio.timeout(limit):
                    chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout("between_events") from None
            except httpx.HTTPError as exc:
                raise UpstreamFailed(f"the provider's stream broke: {exc!r}", True) from None
            yield chunk

    async def events(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The answer's server-sent events, each as soon as its blank line arrives, with
        its own bytes (terminator included). A stream that ends inside an event raises."""
        pending = b""
        async for chunk in self.chunks(response):
            pending += chunk
            while True:
                end, size = _boundary(pending)
                if end < 0:
                    break
                yield pending[: end + size]
                pending = pending[end + size :]
        if pending.strip():
            raise UpstreamFailed("the provider's stream ended inside an event", True)


def _boundary(data: bytes) -> tuple[int, int]:
    """Where the first event ends (-1 for not yet) and the length of its terminator."""
    found = [(data.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n")]
    found = [f for f in found if f[0] >= 0]
    return min(found) if found else (-1, 0)
