"""Builds the usage service's server on the shared chassis."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agentplane.usage.v1 import usage_service_pb2
from services.common import codec
from services.common.convert import now_ms
from services.common.partitions import RetentionSweeper
from services.common.peers import AgentClient
from services.common.server import Chassis, server_factory
from services.usage_svc.budget_rpcs import alert_message
from services.usage_svc.budget_store import BudgetStore, Claim
from services.usage_svc.call_log import CallLog, CallLogPolicy
from services.usage_svc.expiry import ExpiredHolds
from services.usage_svc.keys import Layout
from services.usage_svc.otlp import TraceIngest, parse_gateway_addresses
from services.usage_svc.pricing import PriceStore, file_prices
from services.usage_svc.servicer import UsageServicer
from services.usage_svc.store import UsageStore
from services.usage_svc.webhooks import Dispatcher

SERVICE = usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"]
SERVICE_NAME = SERVICE.full_name
TRACES = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"]


def _register(server: grpc.aio.Server, chassis: Chassis) -> Sequence[str]:
    settings = chassis.settings
    layout = Layout(settings.usage_shards)
    budgets = BudgetStore(chassis.redis, layout)
    store = UsageStore(
        chassis.redis, settings.usage_shards, settings.idempotency_ttl_s, periods=budgets,
        retention_s=(settings.hourly_retention_days * 86_400,
                     settings.daily_retention_days * 86_400),
        pipe=chassis.hot_redis, call_log=CallLogPolicy.from_settings(settings),
    )  # fmt: skip
    agents = AgentClient(chassis.peers.agent_channel, settings.auth_cache_s)
    chassis.use_key_lookup(agents.principal)
    calls = CallLog(chassis.redis, layout, CallLogPolicy.from_settings(settings))
    servicer = UsageServicer(
        store,
        budgets,
        PriceStore(chassis.redis, file_prices(settings.price_table_path)),
        agents,
        settings,
        chassis.stream_redis,
        chassis.stopping,
        calls,
    )
    dispatcher = Dispatcher(budgets, layout, settings, claim_json, now_ms)
    chassis.run_in_background(dispatcher.run)
    sweeper = RetentionSweeper(chassis.redis, store, settings.thread_retention_s, "budgets")
    chassis.run_in_background(sweeper.every(settings.retention_sweep_s))
    holds = ExpiredHolds(chassis.redis, store)  # lapsed holds freed (or charged) on time
    chassis.run_in_background(functools.partial(holds.run, interval_s=settings.retention_sweep_s))
    # OTLP trace exports of GenAI spans, counted through the same path (SPEC §16).
    return [
        chassis.serve(server, servicer, SERVICE),
        chassis.serve(
            server,
            TraceIngest(servicer, calls, parse_gateway_addresses(settings.model_gateway_addresses)),
            TRACES,
        ),
    ]


def claim_json(claim: Claim) -> dict[str, object]:
    """A webhook delivery's body: the alert as the REST API shows it."""
    return codec.to_json(alert_message(claim.alert))


create_server = server_factory(_register)
