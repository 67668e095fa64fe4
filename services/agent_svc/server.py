"""Builds the agent service's server on the shared chassis."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from agentplane.agent.v1 import agent_service_pb2
from services.agent_svc.servicer import AgentServicer
from services.agent_svc.store import AgentStore
from services.common.partitions import RetentionSweeper
from services.common.server import Chassis, server_factory

SERVICE = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"]
SERVICE_NAME = SERVICE.full_name


def _register(server: grpc.aio.Server, chassis: Chassis) -> Sequence[str]:
    store = AgentStore(
        chassis.redis,
        request_ttl_s=chassis.settings.idempotency_ttl_s,
        streams=chassis.stream_redis,
    )
    servicer = AgentServicer(store, chassis.peers, chassis.stopping)
    # API keys are this service's own data: it checks tokens against its store directly.
    chassis.use_key_lookup(servicer.principal_for_key)
    settings = chassis.settings
    sweeper = RetentionSweeper(
        chassis.redis, store, settings.agent_retention_s, "agents", due=store.installation
    )
    chassis.run_in_background(sweeper.every(settings.retention_sweep_s))
    chassis.run_in_background(store.installation.keeper(store.every_agent, store.placement))
    return [chassis.serve(server, servicer, SERVICE)]


create_server = server_factory(_register)
