"""The OpenTelemetry instrumentation of the official `openai` client
(`opentelemetry-instrumentation-openai-v2`) exports its spans to agentplane (SPEC §16):
calls made straight to the provider are counted from the spans, equal to the provider's
tally; calls of the same client sent through the model gateway are metered by the
gateway, and their spans are skipped — counted once, not twice. With openai 3.x the
instrumentation (2.4b0) leaves out `server.address`/`server.port` (it does not know the
SDK's httpx2 URL), so MODEL_GATEWAY_ADDRESSES cannot tell; the provider's answer id
(`gen_ai.response.id`), which the gateway keeps for every call it metered, does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from urllib.parse import urlparse

import openai
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.usage_svc.server import create_server as create_usage_server
from tests.helpers.fake_provider import PROVIDER_KEY
from tests.helpers.servers import make_settings
from tests.models.conftest import Stack
from tests.usage_svc.test_otlp import Keep


@contextlib.contextmanager
def instrumented(usage_address: str, token: str) -> Iterator[Keep]:
    """The openai client instrumented, its spans exported (one by one, as they end) to
    the usage service with the agent's key — and kept, to look at."""
    provider = TracerProvider()
    keep = Keep()
    provider.add_span_processor(SimpleSpanProcessor(keep))
    exporter = OTLPSpanExporter(
        endpoint=usage_address, insecure=True, headers=(("authorization", f"Bearer {token}"),)
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield keep
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def chats(client: openai.OpenAI) -> None:
    """A chat call and a streamed chat call (usage in its last chunk)."""
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count the tokens of this"}]
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "and of this stream"}],
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def three_calls(client: openai.OpenAI) -> None:
    """The chats and an embedding."""
    chats(client)
    client.embeddings.create(model="text-embedding-3-small", input="three words here")


def with_usage(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if "gen_ai.usage.input_tokens" in (s.attributes or {})]


async def test_the_openai_instrumentation_counts_once_direct_or_through_the_gateway(
    stack: Stack, redis_url: str
) -> None:
    gateway = urlparse(stack.url)
    settings = make_settings(
        "usage_svc", redis_url, agent_svc_addr=stack.cluster.address("agent"),
        thread_svc_addr=stack.cluster.address("thread"),
        model_gateway_addresses=f"localhost:1,{gateway.hostname}:{gateway.port}",
    )  # fmt: skip
    usage_app, port = await create_usage_server(settings, "127.0.0.1:0")
    await usage_app.start()
    try:
        # Straight to the provider, with the provider's key: only the spans tell.
        direct = openai.OpenAI(base_url=f"{stack.fake.url}/v1", api_key=PROVIDER_KEY)
        with instrumented(f"127.0.0.1:{port}", stack.token) as keep:
            await asyncio.to_thread(three_calls, direct)
        direct.close()
        assert len(with_usage(keep.spans)) == 3
        tally, totals = stack.fake.tally(), await stack.totals()
        assert totals.request_count == 3  # type: ignore[attr-defined]
        assert (totals.prompt_tokens, totals.completion_tokens) == (  # type: ignore[attr-defined]
            tally.prompt,
            tally.completion,
        )
        assert totals.unpriced_request_count == 3  # type: ignore[attr-defined]  # "-2026" models

        # The same client through the model gateway, still exporting: the gateway meters
        # each call; the spans, sent the moment each call ends, are skipped.
        through = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token)
        for _ in range(3):
            with instrumented(f"127.0.0.1:{port}", stack.token) as keep:
                await asyncio.to_thread(chats, through)
            spans = with_usage(keep.spans)
            assert len(spans) == 2
            assert all(s.attributes["gen_ai.response.id"] for s in spans)  # type: ignore[index]
        through.close()
        tally, totals = stack.fake.tally(), await stack.totals()
        assert totals.request_count == 3 + 6  # type: ignore[attr-defined]
        assert (totals.prompt_tokens, totals.completion_tokens) == (  # type: ignore[attr-defined]
            tally.prompt, tally.completion
        )  # fmt: skip
        assert len(await stack.calls()) == 6  # the gateway's own records of its six calls
    finally:
        await usage_app.stop(grace=0)
