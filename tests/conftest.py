"""Shared fixtures: a real redis-server per session, real in-process gRPC servers on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis as redis_sync

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2_grpc
from scripts.redis_server import RedisClusterProcesses, RedisProcess
from services.agent_svc.server import create_server as create_agent_server
from services.usage_svc.server import create_server as create_usage_server
from tests.helpers.servers import (
    Cluster,
    RedisTarget,
    one_service,
    start_cluster,
    stop_cluster,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers from where a test is: tests/e2e are `e2e`; the Redis Cluster variants and
    tests of all three services together (`cluster`, `stack`) are `slow`. `make test-fast`
    leaves both out: what remains are unit and single-service tests."""
    for item in items:
        if "/e2e/" in item.nodeid.replace("::", "/") or item.nodeid.startswith("tests/e2e"):
            item.add_marker(pytest.mark.e2e)
        callspec = getattr(item, "callspec", None)
        whole = {"cluster", "stack"} & set(getattr(item, "fixturenames", ()))
        if whole or (callspec is not None and callspec.params.get("redis_target") == "cluster"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses(masters=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The session's Redis, emptied before each test."""
    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Run the test against a standalone Redis and against a real three-master cluster."""
    if request.param == "cluster":
        cluster: RedisClusterProcesses = request.getfixturevalue("redis_cluster")
        cluster.flush()
        return RedisTarget(cluster.url, True)
    return RedisTarget(request.getfixturevalue("redis_url"), False)


@pytest.fixture
async def agent_stub(
    redis_target: RedisTarget,
) -> AsyncIterator[agent_service_pb2_grpc.AgentServiceStub]:
    stub = agent_service_pb2_grpc.AgentServiceStub
    async with one_service(create_agent_server, "agent_svc", redis_target, stub) as agent:
        yield agent


@pytest.fixture
async def usage_stub(
    redis_target: RedisTarget,
) -> AsyncIterator[usage_service_pb2_grpc.UsageServiceStub]:
    stub = usage_service_pb2_grpc.UsageServiceStub
    async with one_service(create_usage_server, "usage_svc", redis_target, stub) as usage:
        yield usage


@pytest.fixture
async def cluster(
    redis_target: RedisTarget, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """The three services in-process; `@pytest.mark.settings(name=value)` changes theirs."""
    marker = request.node.get_closest_marker("settings")
    overrides = marker.kwargs if marker else {}
    running = await start_cluster(redis_target.url, redis_target.cluster, **overrides)
    yield running
    await stop_cluster(running)
