"""Builds the thread service's server on the shared chassis."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from agentplane.thread.v1 import thread_service_pb2
from services.common.partitions import RetentionSweeper
from services.common.peers import AgentClient
from services.common.server import Chassis, server_factory
from services.thread_svc.servicer import ThreadServicer
from services.thread_svc.store import ThreadStore

SERVICE = thread_service_pb2.DESCRIPTOR.services_by_name["ThreadService"]
SERVICE_NAME = SERVICE.full_name


def _register(server: grpc.aio.Server, chassis: Chassis) -> Sequence[str]:
    store = ThreadStore(
        chassis.redis,
        request_ttl_s=chassis.settings.idempotency_ttl_s,
        streams=chassis.stream_redis,
        max_messages=chassis.settings.thread_max_messages,
    )
    agents = AgentClient(chassis.peers.agent_channel, chassis.settings.auth_cache_s)
    chassis.use_key_lookup(agents.principal)
    servicer = ThreadServicer(store, chassis.peers, agents, chassis.settings, chassis.stopping)
    settings = chassis.settings
    sweeper = RetentionSweeper(
        chassis.redis, store, settings.thread_retention_s, "threads", due=store.installation
    )
    chassis.run_in_background(sweeper.every(settings.retention_sweep_s))
    chassis.run_in_background(store.installation.keeper(store.every_thread, store.placement))
    return [chassis.serve(server, servicer, SERVICE)]


create_server = server_factory(_register)
