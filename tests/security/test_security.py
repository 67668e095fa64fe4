"""docs/api.md §4 end to end: authentication on every RPC, API keys, isolation between owners,
agent tokens, rate limits shared by replicas, and mutual TLS."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2, message_factory, struct_pb2

from agentplane.agent.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    agent_type_pb2,
    api_key_pb2,
)
from agentplane.thread.v1 import thread_pb2, thread_service_pb2, thread_service_pb2_grpc
from agentplane.usage.v1 import usage_pb2, usage_service_pb2, usage_service_pb2_grpc
from scripts.make_certs import write_bundle
from services.agent_svc.server import create_server as create_agent_server
from services.common.errors import details_of
from tests.helpers import ADMIN_TOKEN, authed_channel, expect_error, make_type
from tests.helpers.servers import make_settings, serve_gateway, start_cluster, stop_cluster

SERVICES = [
    ("agent", agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]),
    ("thread", thread_service_pb2.DESCRIPTOR.services_by_name["ThreadService"]),
    ("usage", usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"]),
]
EVERY_RPC = [(backend, method) for backend, service in SERVICES for method in service.methods]
FORGED = "apk_01m89f8gegszs9qkr7mqmygvd7.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
async def stack(redis_url):
    cluster = await start_cluster(redis_url)
    yield cluster
    await stop_cluster(cluster)


async def _call(channel: grpc.aio.Channel, method, metadata) -> None:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = channel.unary_stream if method.server_streaming else channel.unary_unary
    call = kind(path, request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString)(request_cls(), metadata=metadata, timeout=5)  # fmt: skip
    if method.server_streaming:
        await call.read()
    else:
        await call


@pytest.mark.parametrize(("backend", "method"), EVERY_RPC, ids=[m.full_name for _, m in EVERY_RPC])
async def test_every_rpc_refuses_missing_malformed_and_forged_tokens(
    stack, backend, method
) -> None:
    """Parametrised over the descriptors, so a new RPC cannot slip through."""
    async with authed_channel(stack.address(backend), token=None) as channel:
        for metadata in ([], [("authorization", "Basic abc")], [("authorization", f"Bearer {FORGED}")],
                         [("authorization", "Bearer not-a-token")]):  # fmt: skip
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, method, metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, caught.value)


@dataclasses.dataclass
class Tenant:
    name: str
    token: str
    agent: agent_service_pb2_grpc.AgentServiceStub
    thread: thread_service_pb2_grpc.ThreadServiceStub
    usage: usage_service_pb2_grpc.UsageServiceStub
    channels: list[grpc.aio.Channel]


def tenant(stack, name: str, token: str) -> Tenant:
    channels = [authed_channel(stack.address(n), token) for n in ("agent", "thread", "usage")]
    return Tenant(
        name, token,
        agent_service_pb2_grpc.AgentServiceStub(channels[0]),
        thread_service_pb2_grpc.ThreadServiceStub(channels[1]),
        usage_service_pb2_grpc.UsageServiceStub(channels[2]),
        channels,
    )  # fmt: skip


async def owner_key(stack, name: str) -> str:
    reply = await stack.agent.CreateApiKey(
        agent_service_pb2.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_OWNER, subject=name)
    )
    assert reply.token.startswith("apk_") and len(reply.token) > 60
    return reply.token


async def world_of(owner: Tenant) -> tuple[agent_pb2.Agent, agent_pb2.Agent, thread_pb2.Thread]:
    """A project with two peered agents and a thread, made with the owner's own token."""
    project = f"{owner.name}-project"
    made = await owner.agent.CreateProject(
        agent_service_pb2.CreateProjectRequest(
            project_id=project, project={"display_name": owner.name}
        )
    )
    assert made.owner == owner.name
    agents = []
    for n in ("one", "two"):
        agents.append(await owner.agent.SpawnAgent(
            agent_service_pb2.SpawnAgentRequest(project_id=project, agent=agent_pb2.Agent(agent_type_id="coder", name=n))
        ))  # fmt: skip
    for a, b in ((agents[0], agents[1]), (agents[1], agents[0])):
        await owner.agent.UpdateAgent(
            agent_service_pb2.UpdateAgentRequest(
                agent_id=a.id, agent=agent_pb2.Agent(peers=[b.id]),
                update_mask=field_mask_pb2.FieldMask(paths=["peers"]),
            )
        )  # fmt: skip
    thread = await owner.thread.CreateThread(
        thread_service_pb2.CreateThreadRequest(
            thread=thread_pb2.Thread(project_id=project, max_tokens=1000)
        )
    )
    return agents[0], agents[1], thread


async def test_owners_see_and_change_only_their_projects(stack) -> None:
    await make_type(stack.agent)
    alice = tenant(stack, "alice", await owner_key(stack, "alice"))
    bob = tenant(stack, "bob", await owner_key(stack, "bob"))
    a1, _, a_thread = await world_of(alice)
    await world_of(bob)
    mine = await alice.usage.RecordUsage(
        usage_service_pb2.RecordUsageRequest(
            usage_id="u1", thread_id=a_thread.id, agent_id=a1.id, project_id="alice-project",
            model="gpt-4o", prompt_tokens=10, completion_tokens=5,
        )
    )  # fmt: skip
    assert mine.budget.total_tokens == 15

    listed = await bob.agent.ListProjects(agent_service_pb2.ListProjectsRequest())
    assert [p.id for p in listed.projects] == ["bob-project"] and listed.total_size == 1
    not_found = [
        bob.agent.GetProject(agent_service_pb2.GetProjectRequest(project_id="alice-project")),
        bob.agent.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=a1.id)),
        bob.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=a1.id)),
        bob.agent.ListAgents(agent_service_pb2.ListAgentsRequest(project_id="alice-project")),
        bob.agent.GetProjectAgentMetrics(agent_service_pb2.GetProjectAgentMetricsRequest(project_id="alice-project")),
        bob.thread.GetThread(thread_service_pb2.GetThreadRequest(thread_id=a_thread.id)),
        bob.thread.KillThread(thread_service_pb2.KillThreadRequest(thread_id=a_thread.id)),
        bob.thread.ListThreads(thread_service_pb2.ListThreadsRequest(project_id="alice-project")),
        bob.usage.GetThreadBudget(usage_service_pb2.GetThreadBudgetRequest(thread_id=a_thread.id)),
        bob.usage.ReserveBudget(usage_service_pb2.ReserveBudgetRequest(reservation_id="r", thread_id=a_thread.id, tokens=1)),
        bob.usage.GetUsageOverview(usage_service_pb2.GetUsageOverviewRequest(project_id="alice-project")),
        bob.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
            usage_id="x", thread_id=a_thread.id, agent_id=a1.id, project_id="alice-project", model="m")),
    ]  # fmt: skip
    for call in not_found:
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    # Recording into alice's thread under bob's own project is refused, and writes nothing.
    b_agents = await bob.agent.ListAgents(
        agent_service_pb2.ListAgentsRequest(project_id="bob-project")
    )
    await expect_error(
        bob.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
            usage_id="y", thread_id=a_thread.id, agent_id=b_agents.agents[0].id, project_id="bob-project",
            model="m", prompt_tokens=999)),
        grpc.StatusCode.NOT_FOUND,
    )  # fmt: skip
    again = await alice.usage.GetThreadBudget(
        usage_service_pb2.GetThreadBudgetRequest(thread_id=a_thread.id)
    )
    assert again.total_tokens == 15
    zeros = await bob.usage.GetAgentUsage(usage_service_pb2.GetAgentUsageRequest(agent_id=a1.id))
    assert zeros.totals.total_tokens == 0
    for call in (
        bob.agent.ListAgents(agent_service_pb2.ListAgentsRequest(project_id="-")),
        bob.agent.GetOverview(agent_service_pb2.GetOverviewRequest()),
        # A well-formed request: the role is what refuses it (an empty one is refused
        # earlier, by the contract's required fields).
        bob.agent.CreateAgentType(agent_service_pb2.CreateAgentTypeRequest(
            agent_type=agent_type_pb2.AgentType(id="bobs", display_name="Bob's"))),
        bob.usage.ResetUsage(usage_service_pb2.ResetUsageRequest()),
        bob.usage.ListThreadBudgets(usage_service_pb2.ListThreadBudgetsRequest()),
        bob.thread.ListThreads(thread_service_pb2.ListThreadsRequest()),
        bob.agent.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_OWNER, subject="alice")),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED)

    # The same over REST.
    async with serve_gateway(stack) as url:
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {bob.token}"}
        ) as http:
            assert (
                await http.get(f"/api/v1/projects/alice-project/agents/{a1.id}")
            ).status_code == 404
            assert (await http.get(f"/api/v1/agents/{a1.id}")).status_code == 404
            assert (await http.get(f"/api/v1/threads/{a_thread.id}")).status_code == 404
            assert (await http.get(f"/api/v1/usage/threads/{a_thread.id}")).status_code == 404
            assert (await http.get("/api/v1/agents")).status_code == 403
            assert (await http.get("/api/v1/projects/bob-project/agents")).status_code == 200
        async with httpx.AsyncClient(base_url=url) as anonymous:
            assert (await anonymous.get("/api/v1/organism")).status_code == 401
    for t in (alice, bob):
        for channel in t.channels:
            await channel.close()


async def test_agent_tokens_act_only_as_their_agent_and_keys_revoke(stack) -> None:
    await make_type(stack.agent)
    owner = tenant(stack, "carol", await owner_key(stack, "carol"))
    one, two, thread = await world_of(owner)
    made = await owner.agent.CreateApiKey(
        agent_service_pb2.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=one.id)
    )
    assert made.api_key.project_id == "carol-project" and made.api_key.created_by == "carol"
    me = tenant(stack, "one", made.token)
    who = await me.agent.WhoAmI(agent_service_pb2.WhoAmIRequest())
    assert who.role == api_key_pb2.API_KEY_ROLE_AGENT and who.subject == one.id

    body = struct_pb2.Struct()
    body.update({"text": "hi"})
    posted = await me.thread.PostMessage(thread_service_pb2.PostMessageRequest(
        thread_id=thread.id, from_agent=one.id, to_agent=two.id, payload=body))  # fmt: skip
    assert posted.from_agent == one.id
    await expect_error(
        me.thread.PostMessage(
            thread_service_pb2.PostMessageRequest(
                thread_id=thread.id, from_agent=two.id, to_agent=one.id, payload=body
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        reason="NOT_SELF",
    )
    inbox = me.thread.ReceiveMessages(thread_service_pb2.ReceiveMessagesRequest(agent_id=two.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await inbox.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await me.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
        usage_id="own", thread_id=thread.id, agent_id=one.id, project_id="carol-project", model="m"))  # fmt: skip
    await expect_error(
        me.usage.RecordUsage(
            usage_service_pb2.RecordUsageRequest(
                usage_id="other",
                thread_id=thread.id,
                agent_id=two.id,
                project_id="carol-project",
                model="m",
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        me.agent.SpawnAgent(
            agent_service_pb2.SpawnAgentRequest(
                project_id="carol-project", agent=agent_pb2.Agent(agent_type_id="coder", name="x")
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(me.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=two.id)),
                       grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    # Its own task bookkeeping (WORKING/IDLE) is the one move an agent token makes itself.
    started = await me.agent.StartTask(
        agent_service_pb2.StartTaskRequest(agent_id=one.id, task="t")
    )
    assert started.status == agent_pb2.AGENT_STATUS_WORKING
    done = await me.agent.CompleteTask(agent_service_pb2.CompleteTaskRequest(agent_id=one.id))
    assert done.status == agent_pb2.AGENT_STATUS_IDLE and done.tasks_completed == 1
    for move in (
        me.agent.StartTask(agent_service_pb2.StartTaskRequest(agent_id=two.id, task="t")),
        me.agent.CompleteTask(agent_service_pb2.CompleteTaskRequest(agent_id=two.id)),
        me.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=one.id)),
        me.agent.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=one.id)),
    ):
        await expect_error(move, grpc.StatusCode.PERMISSION_DENIED)

    keys = await owner.agent.ListApiKeys(agent_service_pb2.ListApiKeysRequest())
    # The owner sees its own key and the one it made; ApiKey has no token field at all.
    assert {(k.role, k.subject) for k in keys.api_keys} == {
        (api_key_pb2.API_KEY_ROLE_OWNER, "carol"),
        (api_key_pb2.API_KEY_ROLE_AGENT, one.id),
    }
    assert "token" not in api_key_pb2.ApiKey.DESCRIPTOR.fields_by_name
    await owner.agent.RevokeApiKey(
        agent_service_pb2.RevokeApiKeyRequest(key_id=made.api_key.key_id)
    )
    await asyncio.sleep(0.4)  # past AUTH_CACHE_SECONDS (0.2 s in tests): revoked everywhere
    for call in (
        me.agent.WhoAmI(agent_service_pb2.WhoAmIRequest()),
        me.thread.GetThread(thread_service_pb2.GetThreadRequest(thread_id=thread.id)),
        me.usage.GetThreadBudget(usage_service_pb2.GetThreadBudgetRequest(thread_id=thread.id)),
    ):
        await expect_error(call, grpc.StatusCode.UNAUTHENTICATED)
    for t in (owner, me):
        for channel in t.channels:
            await channel.close()


async def test_rate_limits_are_shared_by_replicas(redis_url) -> None:
    stack = await start_cluster(redis_url, rate_limits_text="SpawnAgent=3/min:3")
    second, port = await create_agent_server(
        make_settings("agent_svc", redis_url, rate_limits_text="SpawnAgent=3/min:3",
                      usage_svc_addr=stack.address("usage"), thread_svc_addr=stack.address("thread")),
        "127.0.0.1:0",
    )  # fmt: skip
    await second.start()
    try:
        await make_type(stack.agent)
        token = await owner_key(stack, "dave")
        replicas = [
            authed_channel(stack.address("agent"), token),
            authed_channel(f"127.0.0.1:{port}", token),
        ]
        stubs = [agent_service_pb2_grpc.AgentServiceStub(c) for c in replicas]
        await stubs[0].CreateProject(
            agent_service_pb2.CreateProjectRequest(project_id="d", project={"display_name": "D"})
        )
        for i in range(3):
            await stubs[i % 2].SpawnAgent(agent_service_pb2.SpawnAgentRequest(
                project_id="d", agent=agent_pb2.Agent(agent_type_id="coder", name=f"a{i}")))  # fmt: skip
        error = await expect_error(
            stubs[1].SpawnAgent(
                agent_service_pb2.SpawnAgentRequest(
                    project_id="d", agent=agent_pb2.Agent(agent_type_id="coder", name="a3")
                )
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            reason="RATE_LIMITED",
        )
        retry = [d for d in details_of(error) if type(d).__name__ == "RetryInfo"]
        assert retry and retry[0].retry_delay.ToMilliseconds() > 0
        async with (
            serve_gateway(stack) as url,
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {token}"}) as http,
        ):
            limited = await http.post(
                "/api/v1/projects/d/agents", json={"agent_type_id": "coder", "name": "a4"}
            )
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # The superuser is not limited.
        await stack.agent.SpawnAgent(agent_service_pb2.SpawnAgentRequest(
            project_id="d", agent=agent_pb2.Agent(agent_type_id="coder", name="by-admin")))  # fmt: skip
        for channel in replicas:
            await channel.close()
    finally:
        await second.stop(grace=0)
        await stop_cluster(stack)


async def test_mutual_tls_accepts_its_ca_and_refuses_others(redis_url, tmp_path) -> None:
    good = write_bundle(tmp_path / "good")
    other = write_bundle(tmp_path / "other", ca_name="someone else's CA")
    settings = make_settings("agent_svc", redis_url, tls_cert=str(good["cert"]),
                             tls_key=str(good["key"]), tls_ca=str(good["ca"]))  # fmt: skip
    app, port = await create_agent_server(settings, "127.0.0.1:0")
    await app.start()
    try:

        def credentials(bundle: dict, with_cert: bool = True) -> grpc.ChannelCredentials:
            return grpc.ssl_channel_credentials(
                root_certificates=good["ca"].read_bytes(),
                private_key=bundle["key"].read_bytes() if with_cert else None,
                certificate_chain=bundle["cert"].read_bytes() if with_cert else None,
            )

        metadata = [("authorization", f"Bearer {ADMIN_TOKEN}")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials(good)) as channel:
            who = await agent_service_pb2_grpc.AgentServiceStub(channel).WhoAmI(
                agent_service_pb2.WhoAmIRequest(), metadata=metadata, timeout=5)  # fmt: skip
            assert who.role == api_key_pb2.API_KEY_ROLE_SUPERUSER
        for refused in (credentials(good, with_cert=False), credentials(other)):
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", refused) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await agent_service_pb2_grpc.AgentServiceStub(channel).WhoAmI(
                        agent_service_pb2.WhoAmIRequest(), metadata=metadata, timeout=5)  # fmt: skip
                assert (
                    caught.value.code() == grpc.StatusCode.UNAVAILABLE
                )  # refused at the handshake
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await agent_service_pb2_grpc.AgentServiceStub(plain).WhoAmI(
                    agent_service_pb2.WhoAmIRequest(), metadata=metadata, timeout=5)  # fmt: skip
    finally:
        await app.stop(grace=0)


# String request fields that name no resource another owner could own.
NOT_IDS = {"ack_ids", "agent_type_id", "consumer", "page_token", "payload_type", "reason", "task",
           "scope_id", "url", "event_types", "format"}  # fmt: skip


def _aimed_at(method, ids: dict[str, str]):
    """A request for `method` whose every id field names one of alice's resources."""
    request = message_factory.GetMessageClass(method.input_type)()
    for field in method.input_type.fields:
        name = field.name
        if field.type != field.TYPE_STRING:
            if name in ("tokens", "max_tokens"):
                setattr(request, name, 5)
            continue
        aimed = {
            "project_id": ids["project"], "thread_id": ids["thread"], "model": "gpt-4o",
            "thread_ids": ids["thread"],
            "budget_id": ids["budget"], "webhook_id": ids["webhook"],
            "after_alert_id": f"{ids['budget']}.0.50",
        }  # fmt: skip
        if name in aimed:
            value = aimed[name]
        elif name in ("agent_id", "agent_ids", "from_agent", "to_agent", "to", "agent", "subject"):
            value = ids["agent"]
        elif name in ("usage_id", "reservation_id", "request_id", "key_id"):
            value = "probe-1"
        elif name in NOT_IDS:
            continue
        else:
            raise AssertionError(
                f"{method.full_name}.{name}: say in _aimed_at whether this field names a "
                "resource (then aim it at alice's) or not (add it to NOT_IDS)"
            )
        if field.label == field.LABEL_REPEATED if hasattr(field, "label") else field.is_repeated:
            getattr(request, name).append(value)
        else:
            setattr(request, name, value)
    return request


@pytest.mark.parametrize("attacker", ["other-owner", "limited-key"])
@pytest.mark.parametrize(("backend", "method"), EVERY_RPC, ids=[m.full_name for _, m in EVERY_RPC])
async def test_no_rpc_lets_one_owner_reach_anothers_resources(
    stack, backend, method, attacker
) -> None:
    """Every RPC, aimed at alice's resources with bob's token (or with alice's own key
    limited to another of her projects), is refused or answers with nothing of hers; and
    alice's resources are unchanged afterwards."""
    await make_type(stack.agent)
    alice = tenant(stack, "alice", await owner_key(stack, "alice"))
    a1, _, a_thread = await world_of(alice)
    if attacker == "other-owner":
        bob = tenant(stack, "bob", await owner_key(stack, "bob"))
        await world_of(bob)
    else:
        await alice.agent.CreateProject(agent_service_pb2.CreateProjectRequest(
            project_id="alice-side", project={"display_name": "side"}))  # fmt: skip
        bob = tenant(stack, "bob", await limited_key(alice, "alice-side"))
    budget = await alice.usage.CreateBudget(usage_service_pb2.CreateBudgetRequest(
        project_id="alice-project", budget=usage_pb2.Budget(
            scope=usage_pb2.BUDGET_SCOPE_PROJECT, limit_tokens=1000,
            period=usage_pb2.BUDGET_PERIOD_MONTH)))  # fmt: skip
    hook = await alice.usage.CreateWebhook(usage_service_pb2.CreateWebhookRequest(
        project_id="alice-project", url="http://127.0.0.1:9/hook"))  # fmt: skip
    await alice.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
        usage_id="real", thread_id=a_thread.id, agent_id=a1.id, project_id="alice-project",
        model="gpt-4o", prompt_tokens=10, completion_tokens=5))  # fmt: skip
    ids = {"project": "alice-project", "agent": a1.id, "thread": a_thread.id,
           "budget": budget.budget_id, "webhook": hook.webhook.webhook_id}  # fmt: skip
    request = _aimed_at(method, ids)
    channel = bob.channels[("agent", "thread", "usage").index(backend)]
    response_cls = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response_cls.FromString)(request, timeout=2)  # fmt: skip
            reply = await call.read()
            call.cancel()
        else:
            reply = await channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                              response_deserializer=response_cls.FromString)(request, timeout=5)  # fmt: skip
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in {
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED,
        }, (method.full_name, exc.code(), exc.details())  # fmt: skip
    else:
        # An answer may echo the id it was asked about, and must say nothing else of hers.
        echoed = {
            f.name for f in method.input_type.fields if f.name in method.output_type.fields_by_name
        }
        shown = {f.name: v for f, v in reply.ListFields() if f.name not in echoed}
        if method.name == "BatchGetAgentUsage":  # each entry echoes the id it was asked for
            shown = {"totals": [u.totals for u in reply.usages]}
        if method.name == "BatchGetThreadBudgets":  # an entry with only the id asked for
            assert [b.thread_id for b in reply.budgets] == [ids["thread"]]
            assert [b.max_tokens for b in reply.budgets] == [0]
            shown = {}
        text = str(shown)
        assert not any(value in text for value in ids.values()), (method.full_name, text)
        if method.name == "GetAgentUsage":
            assert reply.totals.total_tokens == 0
        if method.name == "BatchGetAgentUsage":
            assert [u.totals.total_tokens for u in reply.usages] == [0]
    agent = await alice.agent.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=a1.id))
    assert agent.status == agent_pb2.AGENT_STATUS_IDLE and agent.name == "one"
    thread = await alice.thread.GetThread(
        thread_service_pb2.GetThreadRequest(thread_id=a_thread.id)
    )
    assert (
        thread.thread.status == thread_pb2.THREAD_STATUS_ACTIVE and thread.thread.message_count == 0
    )
    budget = await alice.usage.GetThreadBudget(
        usage_service_pb2.GetThreadBudgetRequest(thread_id=a_thread.id)
    )
    assert budget.total_tokens == 15 and budget.reserved_tokens == 0 and not budget.is_closed
    hers = await alice.usage.GetBudget(usage_service_pb2.GetBudgetRequest(
        project_id="alice-project", budget_id=ids["budget"]))  # fmt: skip
    assert hers.used_tokens == 15 and hers.limit_tokens == 1000 and not hers.reset_by
    hooks = await alice.usage.ListWebhooks(
        usage_service_pb2.ListWebhooksRequest(project_id="alice-project")
    )
    assert [w.webhook_id for w in hooks.webhooks] == [ids["webhook"]]
    for t in (alice, bob):
        for c in t.channels:
            await c.close()


async def test_calls_between_services_do_not_spend_the_callers_rate_limit(redis_url) -> None:
    """An agent's posts make the thread service look both agents up (GetAgent) with the
    agent's token; those lookups carry the services' proof and are not limited again, while
    the agent's own GetAgent calls are — and a forged proof changes nothing."""
    stack = await start_cluster(redis_url, rate_limits_text="default_read=2/min:2")
    try:
        await make_type(stack.agent)
        owner = tenant(stack, "erin", await owner_key(stack, "erin"))
        one, two, thread = await world_of(owner)
        made = await owner.agent.CreateApiKey(
            agent_service_pb2.CreateApiKeyRequest(
                role=api_key_pb2.API_KEY_ROLE_AGENT, subject=one.id
            )
        )
        me = tenant(stack, "one", made.token)
        body = struct_pb2.Struct()
        body.update({"text": "hi"})
        for _ in range(5):  # 10 internal GetAgent lookups, far past 2/min
            await me.thread.PostMessage(thread_service_pb2.PostMessageRequest(
                thread_id=thread.id, from_agent=one.id, to_agent=two.id, payload=body))  # fmt: skip
        forged = [("x-agentplane-internal", "0" * 64)]
        for _ in range(2):
            await me.agent.GetAgent(
                agent_service_pb2.GetAgentRequest(agent_id=one.id, view=1), metadata=forged
            )
        await expect_error(
            me.agent.GetAgent(
                agent_service_pb2.GetAgentRequest(agent_id=one.id, view=1), metadata=forged
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            reason="RATE_LIMITED",
        )
        for t in (owner, me):
            for c in t.channels:
                await c.close()
    finally:
        await stop_cluster(stack)


async def limited_key(owner: Tenant, project_id: str) -> str:
    reply = await owner.agent.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
        role=api_key_pb2.API_KEY_ROLE_OWNER, project_id=project_id))  # fmt: skip
    assert reply.api_key.project_id == project_id
    return reply.token


async def test_a_key_limited_to_a_project_reaches_only_that_project(stack) -> None:
    """An owner key made with a project_id sees and changes that project alone, makes no
    project, and mints no key wider than itself — over gRPC and REST."""
    await make_type(stack.agent)
    alice = tenant(stack, "alice", await owner_key(stack, "alice"))
    a1, _, a_thread = await world_of(alice)
    await alice.agent.CreateProject(agent_service_pb2.CreateProjectRequest(
        project_id="alice-side", project={"display_name": "side"}))  # fmt: skip
    side = tenant(stack, "side", await limited_key(alice, "alice-side"))
    who = await side.agent.WhoAmI(agent_service_pb2.WhoAmIRequest())
    assert who.project_id == "alice-side" and who.subject == "alice"
    listed = await side.agent.ListProjects(agent_service_pb2.ListProjectsRequest())
    assert [p.id for p in listed.projects] == ["alice-side"] and listed.total_size == 1
    for call in (
        side.agent.GetProject(agent_service_pb2.GetProjectRequest(project_id="alice-project")),
        side.agent.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=a1.id)),
        side.agent.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=a1.id)),
        side.thread.GetThread(thread_service_pb2.GetThreadRequest(thread_id=a_thread.id)),
        side.usage.GetUsageOverview(usage_service_pb2.GetUsageOverviewRequest(project_id="alice-project")),
        side.agent.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
            role=api_key_pb2.API_KEY_ROLE_AGENT, subject=a1.id)),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    for call in (
        side.agent.CreateProject(agent_service_pb2.CreateProjectRequest(
            project_id="side-new", project={"display_name": "x"})),
        side.agent.CreateApiKey(agent_service_pb2.CreateApiKeyRequest(
            role=api_key_pb2.API_KEY_ROLE_OWNER, project_id="alice-project")),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, reason="PROJECT_LIMITED_KEY")
    # A key it mints without naming a project is as narrow as itself.
    minted = await side.agent.CreateApiKey(
        agent_service_pb2.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_OWNER)
    )
    assert minted.api_key.project_id == "alice-side"
    child = tenant(stack, "child", minted.token)
    assert (await child.agent.WhoAmI(agent_service_pb2.WhoAmIRequest())).project_id == "alice-side"
    await expect_error(
        child.agent.GetProject(agent_service_pb2.GetProjectRequest(project_id="alice-project")),
        grpc.StatusCode.NOT_FOUND,
    )
    # It lists and revokes only keys of its project.
    keys = await side.agent.ListApiKeys(agent_service_pb2.ListApiKeysRequest())
    assert {k.project_id for k in keys.api_keys} == {"alice-side"}
    whole = await alice.agent.ListApiKeys(agent_service_pb2.ListApiKeysRequest())
    unlimited = [k.key_id for k in whole.api_keys if not k.project_id]
    await expect_error(
        side.agent.RevokeApiKey(agent_service_pb2.RevokeApiKeyRequest(key_id=unlimited[0])),
        grpc.StatusCode.NOT_FOUND,
    )
    # Its own project works as usual.
    await side.agent.SpawnAgent(agent_service_pb2.SpawnAgentRequest(
        project_id="alice-side", agent=agent_pb2.Agent(agent_type_id="coder", name="s1")))  # fmt: skip
    async with serve_gateway(stack) as url:
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": f"Bearer {side.token}"}
        ) as http:
            assert (await http.get("/api/v1/projects/alice-project")).status_code == 404
            assert (await http.get(f"/api/v1/agents/{a1.id}")).status_code == 404
            assert (await http.get("/api/v1/projects/alice-side/agents")).status_code == 200
            made = await http.post("/api/v1/projects", json={"id": "x2", "display_name": "x"})
            assert made.status_code == 403, made.text
    for t in (alice, side, child):
        for channel in t.channels:
            await channel.close()


async def test_an_owner_cannot_write_usage_onto_another_owners_agent(stack) -> None:
    """A record's (and a reservation's) agent must be of the project it is written in."""
    await make_type(stack.agent)
    alice = tenant(stack, "alice", await owner_key(stack, "alice"))
    bob = tenant(stack, "bob", await owner_key(stack, "bob"))
    a1, _, _ = await world_of(alice)
    b1, _, b_thread = await world_of(bob)
    big = {"prompt_tokens": 100_000_000, "completion_tokens": 100_000_000}
    await expect_error(
        bob.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
            usage_id="steal", thread_id=b_thread.id, agent_id=a1.id, project_id="bob-project",
            model="gpt-4o", **big)),
        grpc.StatusCode.INVALID_ARGUMENT, field="agent_id",
    )  # fmt: skip
    batch = await bob.usage.RecordUsageBatch(usage_service_pb2.RecordUsageBatchRequest(requests=[
        usage_service_pb2.RecordUsageRequest(usage_id="s2", thread_id=b_thread.id, agent_id=a1.id,
                                             project_id="bob-project", model="gpt-4o", **big),
        usage_service_pb2.RecordUsageRequest(usage_id="ok", thread_id=b_thread.id, agent_id=b1.id,
                                             project_id="bob-project", model="gpt-4o", prompt_tokens=7),
    ]))  # fmt: skip
    assert batch.results[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert batch.results[1].status.code == 0
    await expect_error(
        bob.usage.ReserveBudget(usage_service_pb2.ReserveBudgetRequest(
            reservation_id="r1", thread_id=b_thread.id, agent_id=a1.id, tokens=10)),
        grpc.StatusCode.INVALID_ARGUMENT, field="agent_id",
    )  # fmt: skip
    theirs = await alice.usage.GetAgentUsage(usage_service_pb2.GetAgentUsageRequest(agent_id=a1.id))
    assert theirs.totals.total_tokens == 0
    agent = await alice.agent.GetAgent(agent_service_pb2.GetAgentRequest(agent_id=a1.id))
    assert agent.tokens_used == 0
    budget = await bob.usage.GetThreadBudget(
        usage_service_pb2.GetThreadBudgetRequest(thread_id=b_thread.id)
    )
    assert budget.total_tokens == 7 and budget.reserved_tokens == 0
    for t in (alice, bob):
        for channel in t.channels:
            await channel.close()


async def test_a_terminated_agents_key_writes_nothing(stack) -> None:
    await make_type(stack.agent)
    owner = tenant(stack, "dave", await owner_key(stack, "dave"))
    one, _, thread = await world_of(owner)
    made = await owner.agent.CreateApiKey(
        agent_service_pb2.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=one.id)
    )
    me = tenant(stack, "one", made.token)
    await me.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
        usage_id="before", thread_id=thread.id, agent_id=one.id, model="m", prompt_tokens=3))  # fmt: skip
    await owner.agent.TerminateAgent(agent_service_pb2.TerminateAgentRequest(agent_id=one.id))
    await asyncio.sleep(0.4)  # past AUTH_CACHE_SECONDS (0.2 s in tests)
    for call in (
        me.usage.RecordUsage(usage_service_pb2.RecordUsageRequest(
            usage_id="after", thread_id=thread.id, agent_id=one.id, model="m", prompt_tokens=5)),
        me.usage.RecordUsageBatch(usage_service_pb2.RecordUsageBatchRequest(requests=[
            usage_service_pb2.RecordUsageRequest(usage_id="after2", thread_id=thread.id,
                                                 agent_id=one.id, model="m", prompt_tokens=5)])),
        me.usage.ReserveBudget(usage_service_pb2.ReserveBudgetRequest(
            reservation_id="r", thread_id=thread.id, tokens=5)),
        me.agent.StartTask(agent_service_pb2.StartTaskRequest(agent_id=one.id, task="t")),
    ):  # fmt: skip
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, reason="AGENT_TERMINATED")
    who = await me.agent.WhoAmI(agent_service_pb2.WhoAmIRequest())  # reads still answer
    assert who.agent_terminated
    budget = await owner.usage.GetThreadBudget(
        usage_service_pb2.GetThreadBudgetRequest(thread_id=thread.id)
    )
    assert budget.total_tokens == 3 and budget.reserved_tokens == 0
    for t in (owner, me):
        for channel in t.channels:
            await channel.close()
