"""Budgets, alerts and webhooks over gRPC and REST, on the three real services (and the real
gateway): the RPCs and their checks, refusals naming every budget, alert streams that
resume, signed webhook deliveries with retries, and owners kept to their own projects."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from agentplane.agent.v1 import agent_service_pb2, agent_service_pb2_grpc, api_key_pb2
from agentplane.usage.v1 import usage_pb2, usage_service_pb2, usage_service_pb2_grpc
from services.common.errors import details_of
from services.usage_svc.webhooks import UnsafeUrl, check_url
from tests.helpers import (
    ADMIN_TOKEN,
    authed_channel,
    expect_error,
    make_project,
    make_type,
    spawn,
    until,
)
from tests.helpers.receiver import Receiver
from tests.helpers.servers import serve_gateway, start_cluster, stop_cluster

U = usage_service_pb2
B = usage_pb2


@pytest.fixture
async def stack(redis_target):
    cluster = await start_cluster(redis_target.url, redis_target.cluster)
    await make_type(cluster.agent)
    await make_project(cluster.agent, "demo")
    yield cluster
    await stop_cluster(cluster)


def budget(scope=B.BUDGET_SCOPE_PROJECT, scope_id="", **kw) -> B.Budget:
    kw.setdefault("limit_tokens", 1000)
    kw.setdefault("period", B.BUDGET_PERIOD_MONTH)
    return B.Budget(scope=scope, scope_id=scope_id, **kw)


async def create(stub, project_id: str = "demo", **kw) -> B.Budget:
    return await stub.CreateBudget(
        U.CreateBudgetRequest(project_id=project_id, budget=budget(**kw))
    )


def record(usage_id: str, agent_id: str, tokens: int, thread: str = "t1", **kw):
    return U.RecordUsageRequest(
        usage_id=usage_id, thread_id=thread, agent_id=agent_id, project_id="demo",
        model="gpt-4o", prompt_tokens=tokens, completion_tokens=0, **kw,
    )  # fmt: skip


async def test_budget_rpcs_and_their_checks(stack) -> None:
    usage = stack.usage
    agent = await spawn(stack.agent, "worker")
    made = await create(usage, scope=B.BUDGET_SCOPE_AGENT, scope_id=agent.id,
                        time_zone="Europe/Berlin", display_name="worker cap")  # fmt: skip
    assert made.budget_id and made.project_id == "demo" and made.alert_thresholds == [50, 80, 100]
    assert made.enforcement == B.BUDGET_ENFORCEMENT_HARD and made.period_end.seconds > 0
    assert made.time_zone == "Europe/Berlin" and made.used_tokens == 0
    bad = [
        (dict(scope=B.BUDGET_SCOPE_UNSPECIFIED), "budget.scope"),
        (dict(scope_id="x"), "budget.scope_id"),
        (dict(scope=B.BUDGET_SCOPE_MODEL), "budget.scope_id"),
        (dict(limit_tokens=0), "budget.limit_tokens"),
        (dict(limit_tokens=-5), "budget.limit_tokens"),
        (dict(limit_cost_micros=-1), "budget.limit_cost_micros"),
        (dict(period=B.BUDGET_PERIOD_UNSPECIFIED), "budget.period"),
        (dict(time_zone="Mars/Olympus"), "budget.time_zone"),
        (dict(alert_thresholds=[0]), "budget.alert_thresholds"),
        (dict(alert_thresholds=list(range(1, 20))), "budget.alert_thresholds"),
    ]
    for fields, field in bad:
        await expect_error(create(usage, **fields), grpc.StatusCode.INVALID_ARGUMENT, field=field)
    await expect_error(
        create(usage, scope=B.BUDGET_SCOPE_AGENT, scope_id="ghost"), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(create(usage, project_id="nowhere"), grpc.StatusCode.NOT_FOUND)
    listed = await usage.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
    assert [b.budget_id for b in listed.budgets] == [made.budget_id]  # refusals wrote nothing
    ref = dict(project_id="demo", budget_id=made.budget_id)
    changed = await usage.UpdateBudget(U.UpdateBudgetRequest(
        **ref, budget=B.Budget(limit_tokens=5000, alert_thresholds=[90]),
        update_mask=field_mask_pb2.FieldMask(paths=["limit_tokens", "alert_thresholds"])))  # fmt: skip
    assert changed.limit_tokens == 5000 and changed.alert_thresholds == [90]
    assert changed.display_name == "worker cap"  # not in the mask: kept
    for path in ("period", "scope", "time_zone", "nonsense"):
        await expect_error(
            usage.UpdateBudget(U.UpdateBudgetRequest(
                **ref, budget=B.Budget(), update_mask=field_mask_pb2.FieldMask(paths=[path]))),
            grpc.StatusCode.INVALID_ARGUMENT, field="update_mask",
        )  # fmt: skip
    await usage.RecordUsage(record("u1", agent.id, 100))
    assert (await usage.GetBudget(U.GetBudgetRequest(**ref))).used_tokens == 100
    reset = await usage.ResetBudget(U.ResetBudgetRequest(**ref))
    assert (
        reset.used_tokens == 0 and reset.reset_by == "superuser:admin" and reset.reset_time.seconds
    )
    periods = await usage.ListBudgetPeriods(U.ListBudgetPeriodsRequest(**ref))
    assert list(periods.periods) == []  # the month has not ended
    await usage.DeleteBudget(U.DeleteBudgetRequest(**ref))
    await expect_error(usage.GetBudget(U.GetBudgetRequest(**ref)), grpc.StatusCode.NOT_FOUND)
    await expect_error(usage.DeleteBudget(U.DeleteBudgetRequest(**ref)), grpc.StatusCode.NOT_FOUND)


async def test_a_refused_reservation_names_every_refusing_budget(stack) -> None:
    usage = stack.usage
    agent = await spawn(stack.agent, "spender")
    await usage.SetThreadBudget(U.SetThreadBudgetRequest(project_id="demo", thread_id="t1",
                                                         max_tokens=10**6))  # fmt: skip
    project = await create(usage, limit_tokens=500)
    model = await create(usage, scope=B.BUDGET_SCOPE_MODEL, scope_id="gpt-4o", limit_tokens=0,
                         limit_cost_micros=1000)  # fmt: skip
    soft = await create(usage, scope=B.BUDGET_SCOPE_AGENT, scope_id=agent.id, limit_tokens=1,
                        enforcement=B.BUDGET_ENFORCEMENT_SOFT)  # fmt: skip
    # gpt-4o's higher price is 10 USD per million tokens: 100 tokens hold 1000 micro-USD.
    held = await usage.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="r1", thread_id="t1", tokens=100, agent_id=agent.id, model="gpt-4o"))  # fmt: skip
    assert held.tokens == 100
    got = await usage.GetBudget(U.GetBudgetRequest(project_id="demo", budget_id=model.budget_id))
    assert got.reserved_cost_micros == 1000 and got.reserved_tokens == 100
    error = await expect_error(
        usage.ReserveBudget(U.ReserveBudgetRequest(
            reservation_id="r2", thread_id="t1", tokens=450, agent_id=agent.id, model="gpt-4o")),
        grpc.StatusCode.RESOURCE_EXHAUSTED, reason="BUDGET_EXHAUSTED",
    )  # fmt: skip
    (quota,) = [d for d in details_of(error) if isinstance(d, error_details_pb2.QuotaFailure)]
    assert sorted(v.subject for v in quota.violations) == sorted(
        [f"budget:{project.budget_id}", f"budget:{model.budget_id}"]
    )  # the SOFT budget, far past its limit, never refuses
    # Without the model, the model budget does not cover the call.
    await usage.ReleaseReservation(U.ReleaseReservationRequest(thread_id="t1", reservation_id="r1"))
    ok = await usage.ReserveBudget(U.ReserveBudgetRequest(
        reservation_id="r3", thread_id="t1", tokens=450, agent_id=agent.id))  # fmt: skip
    assert ok.tokens == 450
    for b in (project, model, soft):
        state = await usage.GetBudget(U.GetBudgetRequest(project_id="demo", budget_id=b.budget_id))
        assert state.reserved_tokens == (0 if b is model else 450), b.budget_id


async def watch(
    stub, after: str = "", count: int = 1, project: str = "demo"
) -> list[B.BudgetAlert]:
    call = stub.WatchBudgetAlerts(
        U.WatchBudgetAlertsRequest(project_id=project, after_alert_id=after)
    )
    got = []
    async with asyncio.timeout(10):
        async for alert in call:
            got.append(alert)
            if len(got) == count:
                break
    call.cancel()
    return got


async def test_alerts_stream_and_resume_after_an_alert_id(stack) -> None:
    usage = stack.usage
    agent = await spawn(stack.agent, "loud")
    b = await create(usage, limit_tokens=1000)
    live = usage.WatchBudgetAlerts(U.WatchBudgetAlertsRequest(project_id="demo"))
    await live.initial_metadata()  # the watch is open (its position taken) before usage comes
    for i, tokens in enumerate([600, 250, 150, 400]):
        await usage.RecordUsage(record(f"u{i}", agent.id, tokens))
    async with asyncio.timeout(10):
        alerts = [await live.read() for _ in range(3)]
    live.cancel()
    assert [a.threshold for a in alerts] == [50, 80, 100]
    assert [a.percent_used for a in alerts] == [60.0, 85.0, 100.0]
    assert all(a.budget_id == b.budget_id and a.scope == B.BUDGET_SCOPE_PROJECT for a in alerts)
    # A reconnect after the first gets the others, once each; after the last, nothing.
    resumed = await watch(usage, after=alerts[0].alert_id, count=2)
    assert [a.alert_id for a in resumed] == [a.alert_id for a in alerts[1:]]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watch(usage, after=alerts[-1].alert_id), 1.0)


async def test_webhook_delivery_is_signed_retried_and_logged(stack) -> None:
    usage = stack.usage
    agent = await spawn(stack.agent, "hooked")
    receiver = await Receiver(statuses=[500, 503]).start()
    made = await usage.CreateWebhook(U.CreateWebhookRequest(project_id="demo", url=receiver.url))
    assert made.secret.startswith("whsec_") and made.webhook.event_types == ["budget.alert"]
    listed = await usage.ListWebhooks(U.ListWebhooksRequest(project_id="demo"))
    assert "secret" not in str(listed) and made.secret not in str(listed)
    b = await create(usage, limit_tokens=1000, alert_thresholds=[50])
    await usage.RecordUsage(record("u1", agent.id, 700))
    deliveries = await receiver.wait_for(3)
    assert [d.answered for d in deliveries] == [500, 503, 200]
    for d in deliveries:
        assert d.signed_by(made.secret)
        assert (
            d.headers["agentplane-event-id"]
            == f"{b.budget_id}.{b.period_start.ToMilliseconds()}.50"
        )
        assert d.headers["content-type"] == "application/json"
    body = json.loads(deliveries[-1].body)
    assert body["budget_id"] == b.budget_id and body["threshold"] == 50
    assert body["percent_used"] == 70.0 and body["used_tokens"] == 700
    assert not deliveries[0].signed_by("whsec_wrong")
    log = U.ListWebhookDeliveriesRequest(project_id="demo", webhook_id=made.webhook.webhook_id)

    async def delivered():
        (entry,) = (await usage.ListWebhookDeliveries(log)).deliveries
        return entry if entry.status == B.DELIVERY_STATUS_DELIVERED else None

    entry = await until(delivered, 5)
    assert (
        entry.attempts == 3
        and entry.last_response_code == 200
        and not entry.next_attempt_time.seconds
    )
    await asyncio.sleep(0.5)
    assert len(receiver.deliveries) == 3  # delivered once: no attempt after the 200
    await receiver.stop()


async def test_a_delivery_connects_to_the_address_that_was_checked(stack, monkeypatch) -> None:
    """DNS rebinding: the name is resolved once per attempt, by the guard, and the
    connection goes to that address (the Host header and TLS keep the name); the HTTP
    client never resolves it again. The fake resolver answers for a name that no real
    resolver knows, so only a connection to the checked address can arrive."""
    from services.usage_svc import webhooks

    asked: list[str] = []

    async def resolve(host: str, port: int):
        asked.append(host)
        if host == "hooks.rebind.test":
            return [ipaddress.ip_address("127.0.0.1")]
        raise OSError("unknown name")

    monkeypatch.setattr(webhooks, "_resolve", resolve)
    target = await check_url("https://hooks.rebind.test:8443/a?b=1", False, True)
    assert target == webhooks.Target(
        "https://127.0.0.1:8443/a?b=1", "hooks.rebind.test:8443", "hooks.rebind.test"
    )
    usage = stack.usage
    agent = await spawn(stack.agent, "rebound")
    receiver = await Receiver().start()
    url = f"http://hooks.rebind.test:{receiver.port}/hooks/agentplane"
    made = await usage.CreateWebhook(U.CreateWebhookRequest(project_id="demo", url=url))
    await create(usage, limit_tokens=100, alert_thresholds=[100])
    await usage.RecordUsage(record("u1", agent.id, 100))
    (delivery,) = await receiver.wait_for(1)
    assert delivery.headers["host"] == f"hooks.rebind.test:{receiver.port}"
    assert delivery.signed_by(made.secret)
    assert asked.count("hooks.rebind.test") >= 2  # at creation and before the attempt
    await receiver.stop()


async def test_a_receiver_down_for_a_while_gets_the_alert_when_it_returns(stack) -> None:
    usage = stack.usage
    agent = await spawn(stack.agent, "patient")
    receiver = await Receiver().start()
    port = receiver.port
    await receiver.stop()  # nothing listens there now: connections are refused
    made = await usage.CreateWebhook(U.CreateWebhookRequest(project_id="demo", url=receiver.url))
    await create(usage, limit_tokens=100, alert_thresholds=[100])
    await usage.RecordUsage(record("u1", agent.id, 100))
    log = U.ListWebhookDeliveriesRequest(project_id="demo", webhook_id=made.webhook.webhook_id)

    async def retried():
        found = (await usage.ListWebhookDeliveries(log)).deliveries
        return found[0] if found and found[0].attempts >= 3 else None

    entry = await until(retried)
    assert entry.status == B.DELIVERY_STATUS_PENDING and entry.last_response_code == 0
    assert entry.last_error and entry.next_attempt_time.seconds
    await receiver.start(port)  # back
    (delivery,) = await receiver.wait_for(1)
    assert delivery.signed_by(made.secret)


async def test_webhook_urls_are_guarded(stack) -> None:
    async def refused(url: str, allow_http: bool = True) -> str:
        with pytest.raises(UnsafeUrl) as caught:
            await check_url(url, allow_http=allow_http, allow_private=False)
        return str(caught.value)

    for url in ("https://127.0.0.1/x", "https://10.1.2.3/x", "https://192.168.0.1/x",
                "https://169.254.169.254/latest/meta-data", "https://[::1]/x",
                "https://localhost/x", "https://metadata.google.internal/x",
                "https://[::ffff:127.0.0.1]/x", "https://0.0.0.0/x",
                # special-purpose addresses that are not private in the narrow sense:
                "https://100.100.100.200/x", "https://100.64.0.1/x", "https://[fec0::1]/x",
                "https://[2002:7f00:1::1]/x", "https://[2002:a00:1::1]/x", "https://192.0.0.8/x",
                "https://[64:ff9b::a00:1]/x", "https://[64:ff9b::7f00:1]/x",
                "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x", "https://198.51.100.7/x",
                "https://224.0.0.1/x", "https://[ff02::1]/x"):  # fmt: skip
        assert "globally routable" in await refused(url) or "not allowed" in await refused(url), url
    # IPv4 inside 6to4 and NAT64 that is global passes.
    for url in ("https://[2002:5db8:d822::1]/x", "https://[64:ff9b::5db8:d822]/x"):
        assert (await check_url(url, False, False)).url == url
    assert "https" in await refused("http://93.184.216.34/x", allow_http=False)
    assert "https" in await refused("ftp://example.com/x")
    await refused("https://user:pw@93.184.216.34/x")
    assert (
        await check_url("https://93.184.216.34/x", False, False)
    ).url == "https://93.184.216.34/x"
    # The service applies the guard with its own flags (tests allow loopback: these are off).
    strict = await start_cluster(
        stack.redis_url, stack.redis_cluster,
        webhook_allow_private_networks=False, webhook_allow_http=False,
    )  # fmt: skip
    try:
        await make_project(strict.agent, "strict")
        for url in ("http://93.184.216.34/x", "https://127.0.0.1:8443/x", "not a url"):
            await expect_error(
                strict.usage.CreateWebhook(U.CreateWebhookRequest(project_id="strict", url=url)),
                grpc.StatusCode.INVALID_ARGUMENT, field="url",
            )  # fmt: skip
        listed = await strict.usage.ListWebhooks(U.ListWebhooksRequest(project_id="strict"))
        assert list(listed.webhooks) == []
    finally:
        await stop_cluster(strict)


async def owner(stack, name: str) -> tuple[str, usage_service_pb2_grpc.UsageServiceStub, object]:
    key = await stack.agent.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
        role=api_key_pb2.API_KEY_ROLE_OWNER, subject=name))  # fmt: skip
    channel = authed_channel(stack.address("usage"), key.token)
    return key.token, usage_service_pb2_grpc.UsageServiceStub(channel), channel


async def test_owners_and_agents_see_only_what_is_theirs(stack) -> None:
    alice_token, alice, alice_channel = await owner(stack, "alice")
    bob_token, bob, bob_channel = await owner(stack, "bob")

    alice_agents = agent_service_pb2_grpc.AgentServiceStub(
        authed_channel(stack.address("agent"), alice_token)
    )
    await make_project(alice_agents, "alices")
    worker = await spawn(alice_agents, "w", project_id="alices")
    other = await spawn(alice_agents, "v", project_id="alices")
    mine = await create(alice, "alices", scope=B.BUDGET_SCOPE_AGENT, scope_id=worker.id)
    theirs = await create(alice, "alices", scope=B.BUDGET_SCOPE_AGENT, scope_id=other.id)
    project_budget = await create(alice, "alices")
    hook = await alice.CreateWebhook(
        U.CreateWebhookRequest(project_id="alices", url="http://127.0.0.1:9/h")
    )
    ref = dict(project_id="alices", budget_id=mine.budget_id)
    # bob: everything of alice's is NOT_FOUND, over gRPC...
    for call in (
        bob.GetBudget(U.GetBudgetRequest(**ref)),
        bob.ListBudgets(U.ListBudgetsRequest(project_id="alices")),
        bob.ResetBudget(U.ResetBudgetRequest(**ref)),
        bob.DeleteBudget(U.DeleteBudgetRequest(**ref)),
        bob.ListBudgetPeriods(U.ListBudgetPeriodsRequest(**ref)),
        bob.CreateBudget(U.CreateBudgetRequest(project_id="alices", budget=budget())),
        bob.ListWebhooks(U.ListWebhooksRequest(project_id="alices")),
        bob.DeleteWebhook(U.DeleteWebhookRequest(project_id="alices", webhook_id=hook.webhook.webhook_id)),
        bob.ListWebhookDeliveries(U.ListWebhookDeliveriesRequest(
            project_id="alices", webhook_id=hook.webhook.webhook_id)),
        watch(bob, count=1, project="alices"),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    # ... and over REST.
    async with serve_gateway(stack) as base:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            bob_h = {"Authorization": f"Bearer {bob_token}"}
            for method, path in (
                ("GET", f"/api/v1/projects/alices/budgets/{mine.budget_id}"),
                ("GET", "/api/v1/projects/alices/budgets"),
                ("POST", f"/api/v1/projects/alices/budgets/{mine.budget_id}:reset"),
                ("DELETE", f"/api/v1/projects/alices/budgets/{mine.budget_id}"),
                ("GET", "/api/v1/projects/alices/webhooks"),
                ("GET", f"/api/v1/projects/alices/webhooks/{hook.webhook.webhook_id}/deliveries"),
            ):
                answer = await http.request(
                    method, path, headers=bob_h, json={} if method == "POST" else None
                )
                assert answer.status_code == 404, (method, path, answer.text)
            alice_h = {"Authorization": f"Bearer {alice_token}"}
            made = await http.post("/api/v1/projects/alices/budgets", headers=alice_h, json={
                "scope": "model", "scope_id": "gpt-4o", "limit_cost_micros": 5_000_000,
                "period": "day", "time_zone": "America/New_York"})  # fmt: skip
            assert made.status_code == 200, made.text
            assert made.json()["scope"] == "model" and made.json()["limit_tokens"] == 0
            patched = await http.patch(
                f"/api/v1/projects/alices/budgets/{made.json()['budget_id']}", headers=alice_h,
                json={"limit_cost_micros": 7_000_000})  # fmt: skip
            assert patched.status_code == 200 and patched.json()["limit_cost_micros"] == 7_000_000
            listed = await http.get("/api/v1/projects/alices/budgets", headers=alice_h,
                                    params={"scope": "agent"})  # fmt: skip
            assert [b["budget_id"] for b in listed.json()["budgets"]] == [
                mine.budget_id,
                theirs.budget_id,
            ]
    # An agent token reads its own agent budget, and nothing else; it changes nothing.
    key = await alice_agents.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
        role=api_key_pb2.API_KEY_ROLE_AGENT, project_id="alices", subject=worker.id))  # fmt: skip
    async with authed_channel(stack.address("usage"), key.token) as channel:
        as_agent = usage_service_pb2_grpc.UsageServiceStub(channel)
        own = await as_agent.GetBudget(U.GetBudgetRequest(**ref))
        assert own.budget_id == mine.budget_id
        listed = await as_agent.ListBudgets(U.ListBudgetsRequest(project_id="alices"))
        assert [b.budget_id for b in listed.budgets] == [mine.budget_id]
        for other_id in (theirs.budget_id, project_budget.budget_id):
            await expect_error(
                as_agent.GetBudget(U.GetBudgetRequest(project_id="alices", budget_id=other_id)),
                grpc.StatusCode.NOT_FOUND,
            )
        await expect_error(as_agent.ResetBudget(U.ResetBudgetRequest(**ref)),
                           grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    for channel in (alice_channel, bob_channel):
        await channel.close()


async def test_sse_alerts_carry_ids_and_resume_from_last_event_id(stack) -> None:
    agent = await spawn(stack.agent, "sse")
    await create(stack.usage, limit_tokens=100)
    for i, tokens in enumerate([50, 30, 20]):
        await stack.usage.RecordUsage(record(f"u{i}", agent.id, tokens))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def read(extra: dict[str, str], count: int) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            async with http.stream("GET", "/api/v1/projects/demo/budgets:watchAlerts",
                                   headers={**headers, **extra}) as answer:  # fmt: skip
                assert answer.status_code == 200
                event_id = ""
                async for line in answer.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        events.append((event_id, json.loads(line[6:])))
                        if len(events) == count:
                            break
        return events

    async with serve_gateway(stack) as base:
        first = await read({"Last-Event-ID": "none.0.0"}, 3)  # unknown: everything kept
        assert [e["threshold"] for _, e in first] == [50, 80, 100]
        assert [i for i, _ in first] == [e["alert_id"] for _, e in first]
        rest = await read({"Last-Event-ID": first[0][0]}, 2)
        assert [i for i, _ in rest] == [i for i, _ in first[1:]]


async def test_a_crowded_project_scope_names_its_project_and_model_names_take_200(stack) -> None:
    usage = stack.usage
    for _ in range(10):
        await create(usage, limit_tokens=100)
    caught = await expect_error(create(usage, limit_tokens=100), grpc.StatusCode.FAILED_PRECONDITION,
                                reason="TOO_MANY_BUDGETS")  # fmt: skip
    assert "project 'demo'" in caught.details() and "''" not in caught.details()
    # One limit for model names everywhere: 200 characters.
    agent = await spawn(stack.agent, "named")
    model = "m" * 200
    made = await usage.RecordUsage(U.RecordUsageRequest(
        usage_id="long", thread_id="t1", agent_id=agent.id, project_id="demo", model=model,
        prompt_tokens=1))  # fmt: skip
    assert made.cost_micros == 0
    await create(usage, scope=B.BUDGET_SCOPE_MODEL, scope_id=model, limit_tokens=5)
    assert (
        await usage.GetModelUsage(U.GetModelUsageRequest(model=model))
    ).totals.request_count == 1
    for call, field in (
        (usage.RecordUsage(U.RecordUsageRequest(usage_id="longer", thread_id="t1", agent_id=agent.id,
                                                project_id="demo", model=model + "m")), "model"),
        (usage.GetModelUsage(U.GetModelUsageRequest(model=model + "m")), "model"),
    ):  # fmt: skip
        caught = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, field=field)
        assert "200" in caught.details()


async def test_a_rotated_webhook_secret_signs_beside_the_old_one_for_its_grace(stack) -> None:
    from google.protobuf import duration_pb2

    usage = stack.usage
    agent = await spawn(stack.agent, "rotated")
    receiver = await Receiver().start()
    made = await usage.CreateWebhook(U.CreateWebhookRequest(project_id="demo", url=receiver.url))
    hook = made.webhook.webhook_id
    rotated = await usage.RotateWebhookSecret(U.RotateWebhookSecretRequest(
        project_id="demo", webhook_id=hook, grace_period=duration_pb2.Duration(seconds=60)))  # fmt: skip
    assert rotated.secret.startswith("whsec_") and rotated.secret != made.secret
    assert rotated.previous_secret_expire_time.seconds > 0 and rotated.webhook.webhook_id == hook
    listed = await usage.ListWebhooks(U.ListWebhooksRequest(project_id="demo"))
    assert rotated.secret not in str(listed)
    await create(usage, limit_tokens=100, alert_thresholds=[50, 100])
    await usage.RecordUsage(record("u1", agent.id, 60))
    (first,) = await receiver.wait_for(1)
    assert len(first.signatures) == 2  # v1=<new>,v1=<old>
    assert first.signed_by(rotated.secret) and first.signed_by(made.secret)
    # Rotated again with no grace: only the newest secret signs.
    again = await usage.RotateWebhookSecret(U.RotateWebhookSecretRequest(
        project_id="demo", webhook_id=hook, grace_period=duration_pb2.Duration(seconds=0)))  # fmt: skip
    assert not again.HasField("previous_secret_expire_time")
    await usage.RecordUsage(record("u2", agent.id, 40))
    second = (await receiver.wait_for(2))[1]
    assert second.signatures == [second.signatures[0]] and second.signed_by(again.secret)
    assert not second.signed_by(rotated.secret) and not second.signed_by(made.secret)
    for bad, code in (
        (U.RotateWebhookSecretRequest(project_id="demo", webhook_id="nope"), grpc.StatusCode.NOT_FOUND),
        (U.RotateWebhookSecretRequest(project_id="demo", webhook_id=hook,
                                      grace_period=duration_pb2.Duration(seconds=8 * 86_400)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ):  # fmt: skip
        await expect_error(usage.RotateWebhookSecret(bad), code)
    await receiver.stop()
