"""Each model-gateway call is a span with the OpenTelemetry GenAI attributes, and counted
in Prometheus: calls by model and outcome, tokens by kind, cost, time to first token,
duration, refusals by reason."""

from __future__ import annotations

import openai
from prometheus_client import REGISTRY

from tests.e2e.test_tracing import spans  # noqa: F401  (the in-memory exporter fixture)
from tests.models.test_wire import HELLO, oai, settled


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_call_is_a_genai_span_and_counted(stack, spans) -> None:  # noqa: F811
    before = {
        "ok": sample("agentplane_model_calls_total", model="gpt-4o", outcome="OK"),
        "prompt": sample("agentplane_model_tokens_total", model="gpt-4o", kind="prompt"),
        "cost": sample("agentplane_model_cost_micros_total", model="gpt-4o"),
        "ttft": sample("agentplane_model_time_to_first_token_seconds_count", model="gpt-4o"),
        "refused": sample("agentplane_model_refusals_total", reason="model_not_found"),
    }
    client = oai(stack)
    answer = await client.chat.completions.create(model="gpt-4o", messages=HELLO)
    try:
        await client.chat.completions.create(model="nobody", messages=HELLO)
    except openai.NotFoundError:
        pass
    await settled(stack, 2)
    (span,) = [
        s
        for s in spans.get_finished_spans()
        if s.attributes.get("gen_ai.request.model") == "gpt-4o"
    ]
    attributes = dict(span.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.response.model"] == "gpt-4o-2026"
    assert attributes["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert sample("agentplane_model_calls_total", model="gpt-4o", outcome="OK") == before["ok"] + 1
    assert sample("agentplane_model_tokens_total", model="gpt-4o", kind="prompt") == (
        before["prompt"] + answer.usage.prompt_tokens
    )
    assert sample("agentplane_model_cost_micros_total", model="gpt-4o") > before["cost"]
    assert (
        sample("agentplane_model_time_to_first_token_seconds_count", model="gpt-4o")
        == before["ttft"] + 1
    )
    assert (
        sample("agentplane_model_refusals_total", reason="model_not_found") == before["refused"] + 1
    )
    assert sample("agentplane_model_calls_total", model="-", outcome="REFUSED") >= 1
