"""Server bootstrap shared by every service.

`create_app(settings, bind, register)` builds a `grpc.aio` server with the chassis
interceptor, the standard health service (per service name and ""), server reflection,
and the process's Redis client and peer stubs; `register` adds the service's own
servicers. `serve()` runs one until SIGTERM/SIGINT, then drains it and returns 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import registry, tuning
from services.common.auth import (
    Authenticator,
    Guard,
    KeyLookup,
    RateLimiter,
)
from services.common.clients import PeerClients
from services.common.interceptors import register
from services.common.limits import GRPC_MAX_MESSAGE_BYTES
from services.common.logging import configure_logging, get_logger
from services.common.rates import parse_rate_limits
from services.common.redis import RedisClient, create_pipelined, create_redis
from services.common.reflection import enable_reflection
from services.common.resp import PipelinedRedis
from services.common.settings import Settings, SettingsError
from services.common.telemetry import configure_telemetry
from services.common.tls import server_credentials

log = get_logger("agentplane.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Chassis:
    """What a service's servicers get: settings, Redis, peer stubs, and a stop signal."""

    settings: Settings
    redis: RedisClient
    stream_redis: RedisClient  # for server streams' blocking reads only
    hot_redis: PipelinedRedis | None  # for idempotent hot-path scripts (redis.HotScript)
    peers: PeerClients
    stopping: asyncio.Event
    guard: Guard
    background: list[Callable[[asyncio.Event], Awaitable[None]]] = field(default_factory=list)

    def run_in_background(self, work: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """Run `work(stopping)` while the server serves; it must return once `stopping` is
        set (the shutdown waits for it, bounded by the grace period)."""
        self.background.append(work)

    def use_key_lookup(self, lookup: KeyLookup) -> None:
        """How this process finds the principal of an API key (the agent service: in its
        store; the others: by asking the agent service)."""
        self.guard.authenticator = Authenticator(
            self.settings.admin_token, lookup, self.settings.auth_cache_s
        )

    def serve(self, server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor) -> str:
        """Add `servicer` to `server`, every RPC wrapped by the chassis (auth, input checks,
        errors, logs, traces...); returns the service's full name."""
        register(server, servicer, service, self.settings.service_name, self.guard)
        return str(service.full_name)


Register = Callable[[grpc.aio.Server, Chassis], Sequence[str]]


class GrpcApp:
    """A service process's server: start it, stop it gracefully."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        address: str,
        chassis: Chassis,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.port = port
        self.address = address
        self.chassis = chassis
        self.health = health_servicer
        self.service_names = list(service_names)
        self._monitor: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.server.start()
        await self._set_health(await self._redis_ok())
        self._monitor = asyncio.create_task(self._watch_redis(), name="redis-health")
        self._background = [
            asyncio.ensure_future(work(self.chassis.stopping)) for work in self.chassis.background
        ]
        log.info("serving", port=self.port, address=self.address, services=self.service_names)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, end streams, finish in-flight calls within the grace, release all."""
        grace = self.chassis.settings.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.chassis.stopping.set()
        if self._monitor is not None:
            self._monitor.cancel()
            await _bounded("health monitor", asyncio.wait({self._monitor}), 2.0)
        if self._background:
            await _bounded("background work", asyncio.wait(self._background), grace + 1.0)
        await _bounded("server", self.server.stop(grace), grace + 5.0)
        # Releasing clients must never keep a stopping process alive.
        await _bounded("peer channels", self.chassis.peers.close(), 5.0)
        await _bounded("redis", self.chassis.redis.aclose(), 5.0)
        await _bounded("redis streams", self.chassis.stream_redis.aclose(), 5.0)
        if self.chassis.hot_redis is not None:
            await _bounded("redis pipe", self.chassis.hot_redis.aclose(), 5.0)
        log.info("stopped", port=self.port)

    async def _redis_ok(self) -> bool:
        try:
            async with asyncio.timeout(self.chassis.settings.redis_timeout_s):
                return bool(await self.chassis.redis.ping())
        except Exception:  # any failure to answer means "not serving"
            return False

    async def _set_health(self, ok: bool) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, SERVING if ok else NOT_SERVING)

    async def _watch_redis(self) -> None:
        """Follow Redis: NOT_SERVING while it is unreachable, SERVING when it returns."""
        previous: bool | None = None
        while True:
            ok = await self._redis_ok()
            if ok != previous:
                await self._set_health(ok)
                (log.info if ok else log.warning)("redis health", reachable=ok)
                previous = ok
            await asyncio.sleep(tuning.HEALTH_INTERVAL_S)


async def _bounded(what: str, step: Awaitable[object], seconds: float) -> None:
    """One shutdown step, given at most `seconds`; a step that overruns is logged and left."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("shutdown step overran; continuing", step=what, seconds=seconds)
    except Exception as exc:  # a failing release must not stop the rest of the shutdown
        log.warning("shutdown step failed; continuing", step=what, error=str(exc))


async def create_app(settings: Settings, bind: str, register: Register) -> GrpcApp:
    """Build (but do not start) a service's server; `bind` may use port 0."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    redis = create_redis(settings)
    hot_redis = create_pipelined(settings)
    peers = PeerClients.connect(settings)
    chassis = Chassis(
        settings=settings,
        redis=redis,
        stream_redis=create_redis(settings, blocking_reads=True),
        hot_redis=hot_redis,
        peers=peers,
        stopping=asyncio.Event(),
        guard=Guard(
            Authenticator(settings.admin_token, Authenticator.no_keys, settings.auth_cache_s),
            RateLimiter(
                redis,
                settings.key_prefix,
                parse_rate_limits(settings.rate_limits_text),
                hot_redis,
            ),
            secret=settings.admin_token,
        ),
    )
    service_names = list(register(server, chassis))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server, [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
    )
    if settings.tls_enabled:
        port = server.add_secure_port(bind, server_credentials(settings))
    else:
        log.warning("TLS_CERT/TLS_KEY/TLS_CA unset: serving plaintext")
        port = server.add_insecure_port(bind)
    address = bind if bind.startswith("unix:") else f"{bind.rsplit(':', 1)[0]}:{port}"
    return GrpcApp(server, port, address, chassis, health_servicer, service_names)


CreateServer = Callable[[Settings, str], Awaitable[tuple[GrpcApp, int]]]


def server_factory(register: Register) -> CreateServer:
    """A service's `create_server(settings, bind) -> (app, port)`: the chassis plus its own
    servicers (`register`). Tests call it with port 0; `main` with GRPC_PORT."""

    async def create_server(settings: Settings, bind: str) -> tuple[GrpcApp, int]:
        app = await create_app(settings, bind, register)
        return app, app.port

    return create_server


async def _wait_for_signal() -> str:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await received


async def serve(
    settings: Settings, create_server: Callable[[Settings, str], Awaitable[tuple[GrpcApp, int]]]
) -> None:
    app, _port = await create_server(settings, settings.grpc_listen)
    await app.start()
    name = await _wait_for_signal()
    log.info("shutting down", signal=name, grace_s=settings.grace_period_s)
    await app.stop()


def main(
    process: registry.Process,
    create_server: Callable[[Settings, str], Awaitable[tuple[GrpcApp, int]]],
) -> int:
    """Entry point of `python -m services.<name>`: exit 0 after a clean stop, 2 on bad settings."""
    service_name = process.label
    try:
        settings = Settings.from_env(
            service_name,
            default_grpc_port=process.port,
            default_metrics_port=process.metrics_port,
        )
    except SettingsError as exc:
        print(f"{service_name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    if len(settings.admin_token) < 16:
        print(
            f"{service_name}: bad configuration: AGENTPLANE_ADMIN_TOKEN must be set "
            "(at least 16 characters; `make run` generates one)",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings)
    configure_telemetry(settings)
    try:
        uvloop.run(serve(settings, create_server))
    except SettingsError as exc:  # e.g. a malformed file that a setting names
        print(f"{service_name}: bad configuration: {exc}", file=sys.stderr)
        return 2
    return 0
