"""Builds the usage service's server on the shared chassis."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from agentplane.usage.v1 import usage_service_pb2
from services.agent_svc.client import AgentClient
from services.common.server import Chassis, server_factory
from services.usage_svc.pricing import PriceTable
from services.usage_svc.servicer import UsageServicer
from services.usage_svc.store import UsageStore

SERVICE = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"]
SERVICE_NAME = SERVICE.full_name


def _register(server: grpc.aio.Server, chassis: Chassis) -> Sequence[str]:
    settings = chassis.settings
    store = UsageStore(chassis.redis, settings.usage_shards, settings.idempotency_ttl_s)
    agents = AgentClient(chassis.peers.agent_channel, settings.auth_cache_s)
    chassis.use_key_lookup(agents.principal)
    servicer = UsageServicer(
        store,
        PriceTable.load(settings.price_table_path),
        settings.default_max_tokens,
        agents,
    )
    return [chassis.serve(server, servicer, SERVICE)]


create_server = server_factory(_register)
