"""Who may call, and how much (SPEC §14): agent keys only; Pause, Kill, termination and
revocation stop new calls; a thread ties a call to its budget; budgets and limits admit
a call before any byte goes upstream, lower its output cap to what fits, or refuse it in
the provider's error format; provider errors pass through; the provider's key is never
shown; bad input gets a clear error and changes nothing."""

from __future__ import annotations

import asyncio

import anthropic
import httpx
import openai
import pytest

from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_pb2 as P
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, until
from tests.helpers.fake_provider import PROVIDER_KEY
from tests.models.test_wire import anth, oai

MESSAGES = [{"role": "user", "content": "hi"}]


async def budget(stack, **fields) -> P.Budget:  # type: ignore[no-untyped-def]
    fields.setdefault("period", P.BUDGET_PERIOD_DAY)
    made = await stack.cluster.usage.CreateBudget(U.CreateBudgetRequest(
        project_id="demo",
        budget=P.Budget(scope=P.BUDGET_SCOPE_PROJECT, enforcement=P.BUDGET_ENFORCEMENT_HARD, **fields),
    ))  # fmt: skip
    return made


async def refused(call, error=openai.APIStatusError):  # type: ignore[no-untyped-def]
    with pytest.raises(error) as caught:
        await call
    return caught.value


async def test_only_an_agent_key_calls(stack) -> None:
    none = await refused(
        stack.keep(openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="apk_nope.nope", max_retries=0))
        .chat.completions.create(model="gpt-4o", messages=MESSAGES)
    )  # fmt: skip
    assert none.status_code == 401 and none.code == "invalid_api_key"
    admin = await refused(
        stack.keep(openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=ADMIN_TOKEN, max_retries=0))
        .chat.completions.create(model="gpt-4o", messages=MESSAGES)
    )  # fmt: skip
    assert admin.status_code == 403 and admin.code == "agent_key_required"
    bare = await refused(
        stack.keep(anthropic.AsyncAnthropic(base_url=stack.url, api_key="nope", max_retries=0))
        .messages.create(model="claude-x", max_tokens=5, messages=MESSAGES),
        anthropic.APIStatusError,
    )  # fmt: skip
    assert bare.status_code == 401 and bare.body["error"]["code"] == "invalid_api_key"
    assert stack.fake.billed == []  # nothing went upstream
    calls = await stack.calls()  # a call with a known caller is logged, refused or not
    assert calls == []


async def test_pause_terminate_and_revocation_stop_the_spending(stack) -> None:
    client = oai(stack)
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await stack.cluster.agent.PauseAgent(A.PauseAgentRequest(agent_id=stack.agent_id))

    async def paused() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        except openai.PermissionDeniedError as exc:
            return exc.code == "agent_paused"
        return False

    async with asyncio.timeout(2):  # on every replica within 2 s (cached 1 s)
        await until(paused)
    await stack.cluster.agent.ResumeAgent(A.ResumeAgentRequest(agent_id=stack.agent_id))
    await until(lambda: _works(client))
    key_id = stack.token[4:30]
    await stack.cluster.agent.RevokeApiKey(A.RevokeApiKeyRequest(key_id=key_id))

    async def revoked() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        except openai.AuthenticationError as exc:
            return exc.code == "invalid_api_key"
        return False

    await until(revoked, timeout=3)
    refusals = await stack.calls(outcome=P.MODEL_CALL_OUTCOME_REFUSED)
    assert "agent_paused" in {c.reason for c in refusals}
    assert all(b.complete for b in stack.fake.billed)


async def _works(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    except openai.APIStatusError:
        return False
    return True


async def test_terminating_the_agent_stops_its_calls(stack) -> None:
    await stack.cluster.agent.TerminateAgent(A.TerminateAgentRequest(agent_id=stack.agent_id))
    error = await refused(oai(stack).chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert error.status_code == 403 and error.code == "agent_terminated"


async def test_a_thread_ties_the_call_to_its_budget_and_a_killed_thread_refuses(stack) -> None:
    thread = await stack.cluster.thread.CreateThread(
        T.CreateThreadRequest(thread=thread_pb2.Thread(project_id="demo", max_tokens=5_000))
    )
    client = oai(stack, default_headers={"Agentplane-Thread": thread.id})
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    spent = await stack.cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id=thread.id))
    assert spent.total_tokens == sum(b.usage.prompt + b.usage.completion for b in stack.fake.billed)
    assert spent.reserved_tokens == 0  # settled
    await stack.cluster.thread.KillThread(T.KillThreadRequest(thread_id=thread.id, reason="stop"))
    await asyncio.sleep(1.1)  # the state cache (1 s)
    error = await refused(client.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert error.status_code == 403 and error.code == "thread_ended"
    other = oai(stack, default_headers={"Agentplane-Thread": "no-such-thread"})
    missing = await refused(other.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert missing.status_code == 404 and missing.code == "thread_not_found"


async def test_the_output_cap_is_lowered_to_what_the_budget_allows(stack) -> None:
    """A HARD budget with room for the prompt bound and a few hundred tokens: the call
    goes up with its cap lowered, the provider stops there, the budget is never passed."""
    client = oai(stack)
    stack.fake.behaviour.pieces = 10_000
    probe = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=20
    )
    bound = int(stack.fake.bodies[0]["max_tokens"])
    assert bound == 20 and probe.http_response.status_code == 200
    made = await budget(stack, limit_tokens=2_000)
    for _ in range(20):
        try:
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=5_000
            )
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded" and made.budget_id in exc.message
            assert exc.response.headers.get("retry-after") is None  # waiting does not help
            break
    else:
        raise AssertionError("never refused")
    caps = [b["max_tokens"] for b in stack.fake.bodies[1:]]
    assert all(cap < 5_000 for cap in caps)  # lowered every time
    now = await stack.cluster.usage.GetBudget(
        U.GetBudgetRequest(project_id="demo", budget_id=made.budget_id)
    )
    assert now.used_tokens <= 2_000 and now.reserved_tokens == 0
    billed = sum(b.usage.prompt + b.usage.completion for b in stack.fake.billed[1:])
    assert billed == now.used_tokens  # by the provider's own tally


async def test_a_window_refusal_is_429_rate_limited_with_retry_after(stack) -> None:
    await budget(stack, period=P.BUDGET_PERIOD_MINUTE, limit_requests=2)
    client = oai(stack)
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    error = await refused(client.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert error.status_code == 429 and error.code == "rate_limited"
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    stopped = await refused(
        anth(stack).messages.create(model="claude-x", max_tokens=5, messages=MESSAGES),
        anthropic.RateLimitError,
    )  # fmt: skip
    assert stopped.body["type"] == "error" and stopped.body["error"]["type"] == "rate_limit_error"
    assert len(stack.fake.billed) == 2


async def test_unknown_model_and_provider_errors_pass_through(stack) -> None:
    client = oai(stack)
    unknown = await refused(client.chat.completions.create(model="nobody-7", messages=MESSAGES))
    assert unknown.status_code == 404 and unknown.code == "model_not_found"
    body = b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}'
    stack.fake.behaviour.error = (429, body)
    passed = await refused(
        client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    )
    assert passed.status_code == 429 and passed.response.content == body
    assert passed.response.headers["retry-after"] == "7"
    calls = await until(lambda: stack.calls(outcome=P.MODEL_CALL_OUTCOME_UPSTREAM_ERROR))
    assert calls[0].http_status == 429 and not calls[0].usage.request_count
    assert (await stack.totals()).request_count == 0  # an error without usage is no request


async def test_bad_input_gets_a_clear_error_and_changes_nothing(stack) -> None:
    headers = {"authorization": f"Bearer {stack.token}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=10) as http:
        cases = {
            b"{not json": (400, "invalid_json"),
            b"[1, 2]": (400, "invalid_request"),
            b'{"messages": []}': (400, "invalid_request"),
            b'{"model": "gpt-4o", "stream": "yes"}': (400, "invalid_request"),
            b'{"model": "gpt-4o", "max_tokens": -3}': (400, "invalid_request"),
        }
        for body, (status, code) in cases.items():
            answer = await http.post("/v1/chat/completions", content=body)
            assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), body
        huge = await http.post("/v1/chat/completions", content=b"x" * (33 * 1024 * 1024))
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        wrong = await http.get("/v1/chat/completions")
        assert wrong.status_code == 405
    assert stack.fake.billed == [] and (await stack.totals()).request_count == 0


async def test_the_provider_key_is_never_shown(stack, capfd) -> None:
    stack.fake.behaviour.error = (500, b'{"error": {"message": "boom"}}')
    client = oai(stack)
    seen: list[str] = []
    for model in ("gpt-4o", "nobody", "claude-x"):
        try:
            await client.chat.completions.create(model=model, messages=MESSAGES)
        except openai.APIStatusError as exc:
            seen.append(exc.response.text + str(exc.response.headers))
    stack.fake.behaviour.error = None
    answer = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES
    )
    seen.append(answer.http_response.text + str(answer.headers))
    out, err = capfd.readouterr()
    assert all(PROVIDER_KEY not in text for text in [*seen, out, err])
    assert f"Bearer {PROVIDER_KEY}" in stack.fake.keys_seen  # (it was used, upstream only)
