"""Streams that do not end well (SPEC §14): cut by the provider, left by the client, timed
out between events or before the first byte, or finished without a usage report. Each
is recorded at least at what the provider billed — an estimate, flagged, never zero —
and a client that leaves cancels the upstream request at once."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from agentplane.usage.v1 import usage_pb2 as P
from tests.helpers import until
from tests.helpers.servers import serve_models
from tests.models.conftest import catalog_for
from tests.models.test_wire import HELLO, oai, settled


async def stream_text(client, **kw) -> str:  # type: ignore[no-untyped-def]
    text = ""
    stream = await client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True, **kw)
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return text


def billed(stack) -> int:  # type: ignore[no-untyped-def]
    return sum(b.usage.prompt + b.usage.completion for b in stack.fake.billed)


async def test_a_stream_cut_by_the_provider_is_recorded_at_least_at_its_bill(stack) -> None:
    stack.fake.behaviour.pieces, stack.fake.behaviour.cut_after = 20, 6
    try:
        text = await stream_text(oai(stack))
    except openai.APIError:
        text = "cut"
    assert text  # the client saw the stream end early
    (call,) = await settled(stack, 1)
    assert call.estimated and call.outcome == P.MODEL_CALL_OUTCOME_UPSTREAM_ERROR
    assert call.usage.total_tokens >= billed(stack) > 0
    totals = await stack.totals()
    assert totals.estimated_request_count == 1 and totals.total_tokens >= billed(stack)


async def test_a_client_that_leaves_cancels_upstream_at_once(stack) -> None:
    stack.fake.behaviour.pieces, stack.fake.behaviour.delay_s = 1_000, 0.05
    headers = {"authorization": f"Bearer {stack.token}"}
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream(
            "POST", f"{stack.url}/v1/chat/completions", headers=headers,
            json={"model": "gpt-4o", "messages": HELLO, "stream": True, "max_tokens": 1000},
        ) as response:  # fmt: skip
            got = 0
            async for chunk in response.aiter_raw():
                got += chunk.count(b'" w')
                if got >= 5:
                    break
    left = asyncio.get_running_loop().time()
    await until(lambda: asyncio.sleep(0, stack.fake.open_streams == 0), timeout=2)
    assert asyncio.get_running_loop().time() - left < 0.5  # cancelled upstream at once
    (call,) = await settled(stack, 1)
    assert call.outcome == P.MODEL_CALL_OUTCOME_CANCELLED and call.estimated
    assert call.usage.total_tokens >= billed(stack) and stack.fake.billed[0].usage.completion < 1000


async def test_timeouts_between_events_and_before_the_first_byte(stack, tmp_path) -> None:
    quick = catalog_for(
        stack.fake, tmp_path, timeouts="{connect: 1s, first_byte: 300ms, between_events: 300ms}"
    )
    async with serve_models(stack.cluster, quick) as url:
        client = stack.keep(
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=stack.token, max_retries=0)
        )
        stack.fake.behaviour.pieces, stack.fake.behaviour.delay_s = 5, 0.6
        try:
            await stream_text(client)
        except openai.APIError:
            pass
        stack.fake.behaviour.delay_s, stack.fake.behaviour.first_delay_s = 0.0, 0.6
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert (refused.value.status_code, refused.value.code) == (504, "upstream_timeout")
        calls = await settled(stack, 2)
    assert {c.outcome for c in calls} == {P.MODEL_CALL_OUTCOME_TIMEOUT}
    assert all(c.estimated and c.usage.total_tokens > 0 for c in calls)
    assert {c.reason for c in calls} == {"between_events", "first_byte"}


async def test_a_provider_that_reports_no_usage_is_estimated_never_zero(stack) -> None:
    stack.fake.behaviour.report_usage = False
    assert await stream_text(oai(stack)) == " w0 w1 w2 w3 w4"
    await oai(stack).chat.completions.create(model="gpt-4o", messages=HELLO)
    calls = await settled(stack, 2)
    assert all(c.estimated and c.outcome == P.MODEL_CALL_OUTCOME_OK for c in calls)
    assert all(c.usage.total_tokens >= b.usage.prompt + b.usage.completion
               for c, b in zip(calls, reversed(stack.fake.billed), strict=True))  # fmt: skip
    assert (await stack.totals()).estimated_request_count == 2


async def test_a_provider_that_cannot_be_reached_costs_nothing(stack, tmp_path) -> None:
    """The connection failed before the request left: 502, the hold given back, no usage
    (the request was tried again once, as it was never sent)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    fake_url, stack.fake.url = stack.fake.url, dead
    catalog = catalog_for(stack.fake, tmp_path)
    stack.fake.url = fake_url
    async with serve_models(stack.cluster, catalog) as url:
        client = stack.keep(
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=stack.token, max_retries=0)
        )
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert (refused.value.status_code, refused.value.code) == (502, "upstream_failed")
        (call,) = await settled(stack, 1)
    assert call.outcome == P.MODEL_CALL_OUTCOME_UPSTREAM_ERROR and not call.usage.request_count
    assert (await stack.totals()).request_count == 0
