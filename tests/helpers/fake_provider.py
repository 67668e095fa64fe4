"""A fake LLM provider: a real HTTP server on loopback speaking OpenAI's and Anthropic's
wire formats (chat completions, responses, embeddings, messages; streaming and not),
with configurable usage, latency, mid-stream cuts and errors — and a tally of every
token it billed, the truth the gateway's records are checked against.

One token per word of the prompt (plus 2 per message), one per piece of the answer; the
answer stops at the output cap the request names, as a provider does. A cut stream, or
one the client leaves, bills its prompt and the pieces generated so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.models import echo, wire
from tests.helpers.servers import make_settings, serve_http

PROVIDER_KEY = "sk-fake-provider-secret-9d1c5e"


@dataclass
class Behaviour:
    pieces: int = 5  # tokens of a full answer
    delay_s: float = 0.0  # before each event of a stream
    first_delay_s: float = 0.0  # before the answer's head
    cut_after: int | None = None  # stream events sent before the connection is dropped
    error: tuple[int, bytes] | None = None  # answer this status and body instead
    cached: int = 0  # prompt tokens read from the cache
    cache_write: int = 0  # prompt tokens written to the cache
    reasoning: int = 0  # of the completion
    report_usage: bool = True


@dataclass
class Billed:
    operation: str
    usage: wire.Usage
    cap: int | None
    complete: bool
    model: str = ""


@dataclass
class FakeProvider:
    behaviour: Behaviour = field(default_factory=Behaviour)
    billed: list[Billed] = field(default_factory=list)
    keys_seen: set[str] = field(default_factory=set)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    sent: list[list[tuple[float, bytes]]] = field(default_factory=list)  # per stream
    open_streams: int = 0
    url: str = ""

    def tally(self) -> wire.Usage:
        total = wire.Usage()
        for b in self.billed:
            for name in ("prompt", "completion", "cached", "cache_write", "reasoning"):
                setattr(total, name, getattr(total, name) + getattr(b.usage, name))
        return total

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.keys_seen.add(headers.get("authorization", "") or headers.get("x-api-key", ""))
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        operation, api = wire.OPERATIONS[scope["path"]]
        request = wire.parse(operation, api, raw, 0)
        self.bodies.append(request.body)
        b = self.behaviour
        if b.first_delay_s:
            await asyncio.sleep(b.first_delay_s)
        if b.error is not None:
            await _whole(send, b.error[0], b.error[1])
            return
        pieces = [f" w{i}" for i in range(min(b.pieces, request.cap or b.pieces))]
        words = len(echo._words({k: request.body.get(k) for k in ("messages", "input", "system")}))
        turns = request.body.get("messages") or []
        prompt = (
            words + 2 * (len(turns) if isinstance(turns, list) else 1) + b.cached + b.cache_write
        )
        completion = 0 if operation == wire.EMBEDDINGS else len(pieces)
        usage = wire.Usage(
            prompt, completion, b.cached, b.cache_write, min(b.reasoning, completion)
        )
        shown = usage if b.report_usage else wire.Usage()
        answer = echo.render(  # each answer its own id, as a provider gives
            request, f"{request.model}-2026", pieces, shown, f"fake{uuid.uuid4().hex}"
        )
        if isinstance(answer, bytes):
            if not b.report_usage:
                data = orjson.loads(answer)
                data.pop("usage", None)
                answer = orjson.dumps(data)
            self.billed.append(Billed(operation, usage, request.cap, True, request.model))
            await _whole(send, 200, answer)
            return
        await self._stream(receive, send, answer, request, usage)

    async def _stream(
        self, receive: Any, send: Any, events: list[bytes], request: wire.Request, usage: wire.Usage
    ) -> None:
        b = self.behaviour
        if not b.report_usage:  # a provider that never says what it used
            events = [e for e in events if b'"usage":{' not in e or b'"choices":[{' in e]
        log: list[tuple[float, bytes]] = []
        self.sent.append(log)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        self.open_streams += 1
        pieces_sent = 0
        complete = False
        gone = asyncio.ensure_future(_disconnect(receive))  # a client that leaves stops it
        try:
            for n, event in enumerate(events):
                if b.cut_after is not None and n >= b.cut_after:
                    raise ConnectionAbortedError("cut by the fake provider")
                if gone.done():
                    return
                if b.delay_s and n:  # the first event at once, the rest spaced
                    await asyncio.sleep(b.delay_s)
                await send({"type": "http.response.body", "body": event, "more_body": True})
                log.append((time.perf_counter(), event))
                pieces_sent += _pieces_in(event)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        finally:
            gone.cancel()
            self.open_streams -= 1
            billed = usage if complete else wire.Usage(usage.prompt, min(pieces_sent, usage.completion),
                                                       usage.cached, usage.cache_write)  # fmt: skip
            self.billed.append(
                Billed(request.operation, billed, request.cap, complete, request.model)
            )


async def _disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _pieces_in(event: bytes) -> int:
    """Answer pieces (tokens) an event carries: ' w<n>' each."""
    return event.count(b'" w')


async def _whole(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"7")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


@contextlib.asynccontextmanager
async def fake_provider() -> AsyncIterator[FakeProvider]:
    """The fake provider on a port of its own; `.url` is its root."""
    fake = FakeProvider()
    settings = make_settings("fake_provider", "redis://127.0.0.1:1/0", bind_host="127.0.0.1")
    async with serve_http(settings, fake) as url:
        fake.url = url
        yield fake


def providers_yaml(
    fake_url: str, timeouts: str = "{connect: 2s, first_byte: 5s, between_events: 5s}"
) -> str:
    """A providers file: the fake under both APIs, and echo."""
    return f"""providers:
  - name: fake-openai
    api: openai
    base_url: {fake_url}/v1
    api_key_env: FAKE_PROVIDER_KEY
    models: ["gpt-*", "text-embedding-*"]
    max_output_tokens: 64
    timeouts: {timeouts}
  - name: fake-anthropic
    api: anthropic
    base_url: {fake_url}
    api_key_env: FAKE_PROVIDER_KEY
    models: ["claude-*"]
    max_output_tokens: 64
    timeouts: {timeouts}
  - name: echo
    api: echo
    models: ["echo-1"]
    max_output_tokens: 256
"""


class FakeProviderProcess(FakeProvider):
    """The fake provider as a process of its own (`python -m tests.helpers.fake_provider`):
    its behaviour from FAKE_* variables, its tally at `GET /tally`."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/tally":
            total = self.tally()
            body = orjson.dumps({"calls": len(self.billed), "open_streams": self.open_streams,
                                 "prompt": total.prompt, "completion": total.completion})  # fmt: skip
            await _whole(send, 200, body)
            return
        await super().__call__(scope, receive, send)


def main() -> None:
    import os

    from gateway.server import listen, make_server

    fake = FakeProviderProcess(Behaviour(
        pieces=int(os.environ.get("FAKE_PIECES", "5")),
        delay_s=float(os.environ.get("FAKE_DELAY_S", "0")),
    ))  # fmt: skip
    settings = make_settings(
        "fake_provider", "redis://127.0.0.1:1/0", bind_host="127.0.0.1",
        http_max_connections=int(os.environ.get("FAKE_MAX_CONNECTIONS", "20000")),
    )  # fmt: skip
    sock = listen(settings, 0)
    print(orjson.dumps({"event": "listening", "port": sock.getsockname()[1]}).decode(), flush=True)
    make_server(settings, fake).run(sockets=[sock])


if __name__ == "__main__":
    main()
