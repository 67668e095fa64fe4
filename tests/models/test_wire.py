"""The official `openai` and `anthropic` SDKs, sync and async, streaming and not, through
the model gateway to the fake provider: the usage recorded equals the provider's own
tally, every token kind, and the client sees what the provider sent."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import pytest

from agentplane.usage.v1 import usage_pb2 as P
from tests.helpers import until
from tests.helpers.fake_provider import PROVIDER_KEY

HELLO = [{"role": "user", "content": "hello there model"}]


def oai(stack, **kw):  # type: ignore[no-untyped-def]
    return stack.keep(
        openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, max_retries=0, **kw)
    )


def sync_oai(stack):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, max_retries=0)


def anth(stack):  # type: ignore[no-untyped-def]
    return stack.keep(
        anthropic.AsyncAnthropic(base_url=stack.url, api_key=stack.token, max_retries=0)
    )


async def settled(stack, n: int):  # type: ignore[no-untyped-def]
    """The call log once `n` calls are in it (streams settle just after their last event)."""

    async def enough() -> list:  # type: ignore[type-arg]
        found = await stack.calls()
        return found if len(found) >= n else []

    return await until(enough)


async def test_chat_non_streaming_sync_and_async_record_the_providers_usage(stack) -> None:
    stack.fake.behaviour.cached, stack.fake.behaviour.reasoning = 3, 2
    answer = await oai(stack).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.choices[0].message.content == " w0 w1 w2 w3 w4"
    raw = await asyncio.to_thread(
        lambda: sync_oai(stack).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO
        )
    )
    assert raw.headers["agentplane-usage-id"] and int(raw.headers["agentplane-cost-micros"]) > 0
    tally = stack.fake.tally()
    assert (tally.prompt, tally.completion, tally.cached, tally.reasoning) == (2 * 8, 10, 6, 4)
    totals = await stack.totals()
    assert (totals.prompt_tokens, totals.completion_tokens) == (tally.prompt, tally.completion)
    assert (totals.cached_prompt_tokens, totals.reasoning_tokens) == (tally.cached, tally.reasoning)
    assert totals.request_count == 2 and totals.estimated_request_count == 0
    assert stack.fake.keys_seen == {f"Bearer {PROVIDER_KEY}"}  # never the agent's key
    calls = await settled(stack, 2)
    assert {c.outcome for c in calls} == {P.MODEL_CALL_OUTCOME_OK}
    assert calls[0].model == "gpt-4o-2026" and calls[0].model_requested == "gpt-4o"
    assert calls[0].usage.total_tokens == 13 and calls[0].usage.total_cost_micros > 0
    assert calls[0].provider == "fake-openai" and calls[0].http_status == 200


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_chat_stream_passes_event_by_event_and_the_usage_chunk_only_when_asked(
    stack, include_usage: bool
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    client = oai(stack)
    async with await client.chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True, **options
    ) as stream:
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " w0 w1 w2 w3 w4"
    assert any(c.usage for c in chunks) is include_usage
    assert stack.fake.bodies[0]["stream_options"]["include_usage"] is True  # asked upstream
    (calls,) = [await settled(stack, 1)]
    tally = stack.fake.tally()
    assert calls[0].usage.prompt_tokens == tally.prompt and calls[0].usage.completion_tokens == 5
    assert not calls[0].estimated and calls[0].stream


async def test_the_client_sees_the_providers_events_byte_for_byte_as_they_come(stack) -> None:
    """Raw HTTP: every event the provider sent, in order and unchanged but the stripped
    usage chunk, each forwarded as soon as it came (its delay measured)."""
    import httpx

    stack.fake.behaviour.delay_s = 0.05
    seen: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST", f"{stack.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {stack.token}"},
            json={"model": "gpt-4o", "messages": HELLO, "stream": True},
        ) as response:  # fmt: skip
            assert response.status_code == 200
            pending = b""
            async for chunk in response.aiter_raw():
                pending += chunk
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    seen.append((asyncio.get_running_loop().time(), event + b"\n\n"))
    import time

    offset = time.perf_counter() - asyncio.get_running_loop().time()
    sent = stack.fake.sent[0]
    expected = [e for _, e in sent if b'"choices":[]' not in e]
    assert [e for _, e in seen] == expected
    delays = [seen_at + offset - sent_at for (seen_at, _), (sent_at, e) in
              zip(seen, [s for s in sent if b'"choices":[]' not in s[1]], strict=True)]  # fmt: skip
    assert max(delays) < 0.04, delays  # each passed on well before the next (50 ms later)


async def test_anthropic_messages_count_cache_reads_and_writes_in_the_prompt(stack) -> None:
    stack.fake.behaviour.cached, stack.fake.behaviour.cache_write = 4, 7
    client = anth(stack)
    whole = await client.messages.create(model="claude-sonnet-4", max_tokens=50, messages=HELLO)
    assert whole.content[0].text == " w0 w1 w2 w3 w4"
    async with client.messages.stream(model="claude-sonnet-4", max_tokens=3, messages=HELLO) as s:
        text = "".join([t async for t in s.text_stream])
    assert text == " w0 w1 w2"  # the provider stopped at the cap the request named
    calls = await settled(stack, 2)
    tally = stack.fake.tally()
    assert (tally.prompt, tally.completion, tally.cached, tally.cache_write) == (2 * 16, 8, 8, 14)
    totals = await stack.totals()
    assert (totals.prompt_tokens, totals.completion_tokens) == (tally.prompt, tally.completion)
    assert (totals.cached_prompt_tokens, totals.cache_write_tokens) == (8, 14)
    assert {c.operation for c in calls} == {"messages"}


async def test_responses_and_embeddings_streaming_and_not(stack) -> None:
    client = oai(stack)
    whole = await client.responses.create(
        model="gpt-4.1", input="say something", max_output_tokens=4
    )
    assert whole.output_text == " w0 w1 w2 w3"
    stream = await client.responses.create(model="gpt-4.1", input="say something", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    vectors = await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 8
    await settled(stack, 3)
    tally = stack.fake.tally()
    totals = await stack.totals()
    assert (totals.prompt_tokens, totals.completion_tokens) == (tally.prompt, tally.completion)
    assert totals.request_count == 3


async def test_models_lists_what_the_key_may_call_in_each_format(stack) -> None:
    listed = await oai(stack).models.list()
    assert [m.id for m in listed.data] == ["echo-1"]  # patterns cannot be listed
    page = await anth(stack).models.list()
    assert [m.id for m in page.data] == ["echo-1"]


async def test_the_echo_provider_answers_offline_in_both_formats(stack) -> None:
    answer = await oai(stack).chat.completions.create(model="echo-1", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hello there model"
    assert answer.usage.completion_tokens == 4
    reply = await anth(stack).messages.create(model="echo-1", max_tokens=2, messages=HELLO)
    assert reply.content[0].text == "echo: hello"
    await settled(stack, 2)
    assert (await stack.totals()).request_count == 2


async def test_the_sync_anthropic_client_streams_too(stack) -> None:
    def call() -> str:
        client = anthropic.Anthropic(base_url=stack.url, api_key=stack.token, max_retries=0)
        with client.messages.stream(model="claude-x", max_tokens=4, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
        client.close()
        return text

    assert await asyncio.to_thread(call) == " w0 w1 w2 w3"
    (entry,) = await settled(stack, 1)
    assert entry.usage.completion_tokens == 4 and entry.stream and not entry.estimated
