"""Real servers for tests: settings, one service or the whole cluster in-process, and the
gateway's real HTTP server — all on unix sockets or port 0."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.thread.v1 import thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2_grpc
from services.agent_svc.server import create_server as create_agent_server
from services.common import registry
from services.common.server import GrpcApp
from services.common.settings import Settings
from services.thread_svc.server import create_server as create_thread_server
from services.usage_svc.server import create_server as create_usage_server
from tests.helpers import ADMIN_TOKEN, authed_channel


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    url: str
    cluster: bool


def make_settings(
    service_name: str, redis_url: str, cluster: bool = False, **overrides: object
) -> Settings:
    """Settings for an in-process server; peers point at nothing unless given."""
    closed = "unix:/nonexistent/agentplane-peer.sock"  # no port that anything could take
    base = Settings.from_env(
        service_name,
        env={
            "REDIS_CLUSTER": "true" if cluster else "false",
            "REDIS_URL": redis_url,
            **{service.address_env: closed for service in registry.SERVICES},
            "METRICS_PORT": "0",
            "AGENTPLANE_ADMIN_TOKEN": ADMIN_TOKEN,
            "AUTH_CACHE_SECONDS": "0.2",
            # Webhook receivers in tests are plain-HTTP servers on loopback.
            "WEBHOOK_ALLOW_HTTP": "true",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "WEBHOOK_BACKOFF_BASE_SECONDS": "0.05",
            "WEBHOOK_BACKOFF_MAX_SECONDS": "0.3",
            "WEBHOOK_POLL_SECONDS": "0.05",
        },
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def one_service(create, name: str, target: RedisTarget, stub_class):  # type: ignore[no-untyped-def]
    """One service alone in-process (peers unreachable), and a superuser stub to it."""
    app, port = await create(make_settings(name, target.url, target.cluster), "127.0.0.1:0")
    await app.start()
    try:
        async with authed_channel(f"127.0.0.1:{port}") as channel:
            yield stub_class(channel)
    finally:
        await app.stop(grace=0)


@dataclasses.dataclass
class Cluster:
    """The three services in-process, wired to each other, on one Redis. They listen on
    unix sockets in a private folder: their addresses are known before any of them starts
    (each needs the others'), and no port is picked that something else could take."""

    apps: dict[str, GrpcApp]
    channels: list[grpc.aio.Channel]
    agent: agent_service_pb2_grpc.AgentServiceStub
    thread: thread_service_pb2_grpc.ThreadServiceStub
    usage: usage_service_pb2_grpc.UsageServiceStub
    redis_url: str
    redis_cluster: bool
    addresses: dict[str, str]

    def address(self, name: str) -> str:
        return self.addresses[name]


async def start_cluster(
    redis_url: str, redis_cluster: bool = False, **overrides: object
) -> Cluster:
    folder = tempfile.mkdtemp(prefix="ap-")
    addresses = {s.name: f"unix:{folder}/{s.name}.sock" for s in registry.SERVICES}
    env = {f"{name}_svc_addr": address for name, address in addresses.items()}
    creators = {"agent": create_agent_server, "thread": create_thread_server,
                "usage": create_usage_server}  # fmt: skip
    apps: dict[str, GrpcApp] = {}
    for service in reversed(registry.SERVICES):  # each connects to its peers lazily
        settings = make_settings(service.label, redis_url, redis_cluster, **env, **overrides)
        app, _ = await creators[service.name](settings, addresses[service.name])
        await app.start()
        apps[service.name] = app
    channels = [authed_channel(addresses[s.name]) for s in registry.SERVICES]
    return Cluster(
        apps=apps,
        channels=channels,
        agent=agent_service_pb2_grpc.AgentServiceStub(channels[0]),
        thread=thread_service_pb2_grpc.ThreadServiceStub(channels[1]),
        usage=usage_service_pb2_grpc.UsageServiceStub(channels[2]),
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        addresses=addresses,
    )


async def stop_cluster(cluster: Cluster) -> None:
    for channel in cluster.channels:
        await channel.close()
    for app in cluster.apps.values():
        await app.stop(grace=0)


@contextlib.asynccontextmanager
async def serve_http(settings: Settings, app: Any) -> AsyncIterator[str]:
    """An ASGI app on the gateways' real HTTP server, port 0; yields its URL."""
    from gateway.server import listen, make_server

    sock = listen(settings, 0)
    port = sock.getsockname()[1]
    server = make_server(settings, app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn offers no event for this
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gateway_settings(cluster: Cluster, name: str, **overrides: object) -> Settings:
    return make_settings(
        name, cluster.redis_url, cluster.redis_cluster,
        agent_svc_addr=cluster.address("agent"), thread_svc_addr=cluster.address("thread"),
        usage_svc_addr=cluster.address("usage"), bind_host="127.0.0.1", **overrides,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def serve_gateway(cluster: Cluster, **overrides: object) -> AsyncIterator[str]:
    """The real gateway app and HTTP server on port 0, wired to `cluster`; yields its URL."""
    from gateway.app import create_app

    settings = gateway_settings(cluster, "gateway", **overrides)
    async with serve_http(settings, create_app(settings)) as url:
        yield url


@contextlib.asynccontextmanager
async def serve_models(cluster: Cluster, catalog: Any, **overrides: object) -> AsyncIterator[str]:
    """The real model gateway and HTTP server on port 0, wired to `cluster`; yields its URL."""
    from gateway.models.app import ModelsApp

    settings = gateway_settings(cluster, "model_gateway", **overrides)
    async with serve_http(settings, ModelsApp(settings, catalog)) as url:
        yield url


@contextlib.asynccontextmanager
async def store_clients(service_name: str, target: RedisTarget) -> AsyncIterator[tuple[Any, Any]]:
    """The Redis clients a service's store uses (ordinary, and blocking reads), for testing
    a store on its own."""
    from services.common.redis import create_redis

    settings = make_settings(service_name, target.url, target.cluster)
    redis, streams = create_redis(settings), create_redis(settings, blocking_reads=True)
    try:
        yield redis, streams
    finally:
        await redis.aclose()
        await streams.aclose()
