"""The model gateway's call log (SPEC §14) on the usage service: a call with usage is
logged in the same step as its record and only once (a retried settle logs nothing more);
a call without usage by LogModelCall; ListModelCalls pages newest first and filters."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from ulid import ULID

from agentplane.usage.v1 import usage_pb2 as P
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import expect_error

OK, REFUSED = P.MODEL_CALL_OUTCOME_OK, P.MODEL_CALL_OUTCOME_REFUSED


def call(
    agent: str = "a1", outcome: int = OK, model: str = "gpt-4o", at_ms: int = 0
) -> P.ModelCall:
    ulid = ULID.from_timestamp(at_ms / 1000) if at_ms else ULID()
    start = timestamp_pb2.Timestamp()
    start.FromMilliseconds(ulid.milliseconds)
    return P.ModelCall(
        call_id=str(ulid), project_id="demo", agent_id=agent, model_requested=model,
        model=model, provider="echo", outcome=outcome, http_status=200, start_time=start,
        operation="chat.completions",
    )  # fmt: skip


async def calls(stub, **kw) -> list[P.ModelCall]:  # type: ignore[no-untyped-def]
    return list((await stub.ListModelCalls(U.ListModelCallsRequest(project_id="demo", **kw))).calls)


async def test_a_call_is_logged_with_its_record_once(usage_stub) -> None:
    logged = call()
    request = U.RecordUsageRequest(
        usage_id="u1", agent_id="a1", project_id="demo", model="gpt-4o",
        prompt_tokens=10, completion_tokens=5, call=logged,
    )  # fmt: skip
    await usage_stub.RecordUsage(request)
    assert (await usage_stub.RecordUsage(request)).duplicate
    assert [c.call_id for c in await calls(usage_stub)] == [logged.call_id]
    wrong = U.RecordUsageRequest()
    wrong.CopyFrom(request)
    wrong.usage_id, wrong.call.agent_id = "u2", "a2"
    await expect_error(
        usage_stub.RecordUsage(wrong), grpc.StatusCode.INVALID_ARGUMENT, field="call"
    )
    wrong.call.agent_id, wrong.call.call_id = "a1", "not-a-ulid"
    await expect_error(
        usage_stub.RecordUsage(wrong), grpc.StatusCode.INVALID_ARGUMENT, field="call.call_id"
    )
    assert len(await calls(usage_stub)) == 1  # nothing half-written


async def test_list_pages_newest_first_and_filters(usage_stub) -> None:
    base = 1_900_000_000_000
    made = [
        call(agent=f"a{i % 3}", outcome=REFUSED if i % 2 else OK, at_ms=base + i) for i in range(30)
    ]
    for item in made:
        await usage_stub.LogModelCall(U.LogModelCallRequest(call=item))
    first = await usage_stub.ListModelCalls(
        U.ListModelCallsRequest(project_id="demo", page_size=20)
    )
    assert [c.call_id for c in first.calls] == [c.call_id for c in reversed(made)][:20]
    rest = await usage_stub.ListModelCalls(
        U.ListModelCallsRequest(project_id="demo", page_size=20, page_token=first.next_page_token)
    )
    assert [c.call_id for c in rest.calls] == [c.call_id for c in reversed(made)][20:]
    assert not rest.next_page_token
    refused_a1 = await calls(usage_stub, agent_id="a1", outcome=REFUSED)
    assert [c.call_id for c in refused_a1] == [
        c.call_id for c in reversed(made) if c.agent_id == "a1" and c.outcome == REFUSED
    ]
    since = timestamp_pb2.Timestamp()
    since.FromMilliseconds(base + 25)
    assert len(await calls(usage_stub, start_time=since)) == 5
    await expect_error(
        usage_stub.LogModelCall(U.LogModelCallRequest(call=P.ModelCall(call_id="x", project_id="demo"))),
        grpc.StatusCode.INVALID_ARGUMENT, field="call.call_id",
    )  # fmt: skip
