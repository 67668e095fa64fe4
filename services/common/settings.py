"""Process settings: one frozen dataclass, built once from the environment and passed down."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from services.common import registry
from services.common.rates import parse_rate_limits


class SettingsError(ValueError):
    """A bad environment value; the message names the variable and what it must be."""


def _number(
    env: Mapping[str, str], name: str, default: float, lo: float, hi: float, kind: type
) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name}={raw!r} is not {what}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    return int(_number(env, name, default, lo, hi, int))


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    return float(_number(env, name, default, lo, hi, float))


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str) -> float:
    """Seconds from "90", "250ms", "30s", "15m", "12h", "7d", "2w" or a sum like "1d12h"; ValueError
    otherwise."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|[smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(text)
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _duration(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse_duration(raw)
    except ValueError:
        raise SettingsError(
            f"{name}={raw!r} is not a duration (seconds, or like 30s, 15m, 12h, 7d)"
        ) from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={raw} is out of range [{lo:g} s, {hi:g} s]")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: set[str]) -> str:
    value = env.get(name) or default
    if value.lower() not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {sorted(choices)}")
    return value.lower()


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    if value.startswith("unix:/"):  # a unix socket (e.g. a peer in the same pod)
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingsError(f"{name}={value!r} must be host:port or unix:/path")
    return value


def _peer(env: Mapping[str, str], process: registry.Process) -> str:
    return _address(env, process.address_env, process.default_address)


def _file(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if value and not os.path.isfile(value):
        raise SettingsError(f"{name}={value!r} is not a readable file")
    return value


def _rate_limits(env: Mapping[str, str]) -> str:
    text = env.get("RATE_LIMITS", "")
    try:
        parse_rate_limits(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return text


def _redis_url(env: Mapping[str, str]) -> str:
    value = env.get("REDIS_URL") or "redis://localhost:6379/0"
    parsed = urlparse(value)
    if parsed.scheme not in {"redis", "rediss", "unix"}:
        raise SettingsError(f"REDIS_URL={value!r} must start with redis://, rediss:// or unix://")
    return value


def _bind_host(env: Mapping[str, str]) -> str:
    """BIND_HOST: the address servers listen on ("::", every interface, by default)."""
    host = env.get("BIND_HOST", "::").strip().strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise SettingsError(f"BIND_HOST={host!r} must be an IP address or localhost") from None
    return host


AUTO_PORT = -1  # METRICS_PORT=auto: any free port, written to the log


def _listen_address(env: Mapping[str, str]) -> str:
    """GRPC_ADDRESS: where the gRPC server listens, when BIND_HOST:GRPC_PORT will not do
    (`unix:/path` for a unix socket)."""
    value = env.get("GRPC_ADDRESS", "")
    if value and not value.startswith("unix:/"):
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SettingsError(f"GRPC_ADDRESS={value!r} must be host:port or unix:/path")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a process reads from its environment (docs/api.md §1, §4, §6)."""

    service_name: str
    bind_host: str
    grpc_port: int
    grpc_address: str
    http_port: int
    http_read_timeout_s: float
    http_max_connections: int
    sse_keepalive_s: float
    metrics_port: int
    redis_url: str
    redis_cluster: bool
    redis_timeout_s: float
    redis_max_connections: int
    redis_stream_connections: int
    agent_svc_addr: str
    thread_svc_addr: str
    usage_svc_addr: str
    peer_timeout_s: float
    log_format: str
    log_level: str
    grace_period_s: float
    otlp_endpoint: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    admin_token: str
    default_max_tokens: int
    idempotency_ttl_s: int
    usage_shards: int
    max_payload_bytes: int
    auth_cache_s: float
    rate_limits_text: str
    inbox_claim_idle_s: float
    price_table_path: str
    webhook_allow_http: bool = False
    webhook_allow_private_networks: bool = False
    webhook_timeout_s: float = 10.0
    webhook_retry_for_s: float = 86_400.0
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 3600.0
    webhook_poll_s: float = 0.5
    hourly_retention_days: int = 35
    daily_retention_days: int = 400
    thread_retention_s: float = 7 * 86_400.0
    agent_retention_s: float = 30 * 86_400.0
    thread_max_messages: int = 10_000
    model_http_port: int = 8090
    model_providers_file: str = ""
    min_output_tokens: int = 16
    model_max_body_bytes: int = 32 * 1024 * 1024
    model_call_max_s: float = 600.0
    model_image_tokens: int = 4_000
    model_state_cache_s: float = 1.0
    call_log_retention_s: float = 7 * 86_400.0
    call_log_max: int = 50_000
    model_gateway_addresses: str = ""  # host:port list; OTLP spans sent there are skipped
    retention_sweep_s: float = 10.0
    log_rpc_rate: int = 100  # OK calls logged per second at most (0: every call)
    log_slow_rpc_s: float = 1.0  # calls at least this slow are always logged

    @property
    def key_prefix(self) -> str:
        """The Redis key prefix this process owns (docs/api.md §1): ap:agent:, ap:thread:..."""
        return f"ap:{self.service_name.removesuffix('_svc')}:"

    def peer_address(self, process: registry.Process) -> str:
        """Where the settings say a peer service is."""
        return str(getattr(self, f"{process.name}_svc_addr"))

    @property
    def grpc_listen(self) -> str:
        """Where the gRPC server listens: GRPC_ADDRESS, else BIND_HOST:GRPC_PORT."""
        return self.grpc_address or self.bind_address(self.grpc_port)

    def bind_address(self, port: int) -> str:
        """host:port to listen on (IPv6 addresses in brackets)."""
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{port}"

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key and self.tls_ca)

    @classmethod
    def from_env(
        cls,
        service_name: str,
        *,
        default_grpc_port: int = 0,
        default_metrics_port: int = 0,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Read and check the environment; raise SettingsError naming the bad variable."""
        env = os.environ if env is None else env
        tls = {name: env.get(name, "") for name in ("TLS_CERT", "TLS_KEY", "TLS_CA")}
        if any(tls.values()) and not all(tls.values()):
            missing = sorted(k for k, v in tls.items() if not v)
            raise SettingsError(f"TLS needs TLS_CERT, TLS_KEY and TLS_CA; missing {missing}")
        for name, path in tls.items():
            if path and not os.path.isfile(path):
                raise SettingsError(f"{name}={path!r} is not a readable file")
        return cls(
            service_name=service_name,
            bind_host=_bind_host(env),
            grpc_port=_int(env, "GRPC_PORT", default_grpc_port, 0, 65535),
            grpc_address=_listen_address(env),
            http_port=_int(env, "HTTP_PORT", registry.GATEWAY.port, 0, 65535),
            http_read_timeout_s=_float(env, "HTTP_READ_TIMEOUT_SECONDS", 30.0, 0.1, 3600.0),
            http_max_connections=_int(env, "HTTP_MAX_CONNECTIONS", 2048, 1, 1_000_000),
            sse_keepalive_s=_float(env, "SSE_KEEPALIVE_SECONDS", 15.0, 0.05, 3600.0),
            metrics_port=(
                AUTO_PORT
                if env.get("METRICS_PORT") == "auto"
                else _int(env, "METRICS_PORT", default_metrics_port, 0, 65535)
            ),
            redis_url=_redis_url(env),
            redis_cluster=_bool(env, "REDIS_CLUSTER", False),
            redis_timeout_s=_float(env, "REDIS_TIMEOUT_SECONDS", 2.0, 0.05, 60.0),
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", 128, 4, 10_000),
            redis_stream_connections=_int(env, "REDIS_STREAM_CONNECTIONS", 1000, 4, 100_000),
            agent_svc_addr=_peer(env, registry.AGENT),
            thread_svc_addr=_peer(env, registry.THREAD),
            usage_svc_addr=_peer(env, registry.USAGE),
            peer_timeout_s=_float(env, "PEER_TIMEOUT_SECONDS", 10.0, 0.05, 300.0),
            log_format=_choice(env, "LOG_FORMAT", "json", {"json", "console"}),
            log_level=_choice(
                env, "LOG_LEVEL", "info", {"debug", "info", "warning", "error", "critical"}
            ),
            grace_period_s=_float(env, "SHUTDOWN_GRACE_SECONDS", 10.0, 0.0, 300.0),
            otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            tls_cert=tls["TLS_CERT"],
            tls_key=tls["TLS_KEY"],
            tls_ca=tls["TLS_CA"],
            admin_token=env.get("AGENTPLANE_ADMIN_TOKEN", ""),
            default_max_tokens=_int(env, "DEFAULT_MAX_TOKENS", 100_000, 1, 10**12),
            idempotency_ttl_s=_int(env, "IDEMPOTENCY_TTL_SECONDS", 86_400, 60, 30 * 86_400),
            usage_shards=_int(env, "USAGE_SHARDS", 8, 1, 1024),
            auth_cache_s=_float(env, "AUTH_CACHE_SECONDS", 5.0, 0.0, 300.0),
            rate_limits_text=_rate_limits(env),
            max_payload_bytes=_int(env, "MAX_PAYLOAD_BYTES", 64 * 1024, 256, 4 * 1024 * 1024),
            inbox_claim_idle_s=_float(env, "INBOX_CLAIM_IDLE_SECONDS", 30.0, 0.05, 86_400.0),
            price_table_path=_file(env, "PRICE_TABLE_PATH"),
            webhook_allow_http=_bool(env, "WEBHOOK_ALLOW_HTTP", False),
            webhook_allow_private_networks=_bool(env, "WEBHOOK_ALLOW_PRIVATE_NETWORKS", False),
            webhook_timeout_s=_float(env, "WEBHOOK_TIMEOUT_SECONDS", 10.0, 0.1, 60.0),
            webhook_retry_for_s=_float(
                env, "WEBHOOK_RETRY_FOR_SECONDS", 86_400.0, 86_400.0, 30 * 86_400.0
            ),
            webhook_backoff_base_s=_float(env, "WEBHOOK_BACKOFF_BASE_SECONDS", 1.0, 0.01, 3600.0),
            webhook_backoff_max_s=_float(
                env, "WEBHOOK_BACKOFF_MAX_SECONDS", 3600.0, 0.01, 86_400.0
            ),
            webhook_poll_s=_float(env, "WEBHOOK_POLL_SECONDS", 0.5, 0.01, 60.0),
            hourly_retention_days=_int(env, "USAGE_HOURLY_RETENTION_DAYS", 35, 1, 3660),
            daily_retention_days=_int(env, "USAGE_DAILY_RETENTION_DAYS", 400, 1, 36600),
            thread_retention_s=_duration(
                env, "THREAD_RETENTION", 7 * 86_400.0, 1, 10 * 365 * 86_400
            ),
            agent_retention_s=_duration(
                env, "AGENT_RETENTION", 30 * 86_400.0, 1, 10 * 365 * 86_400
            ),
            thread_max_messages=_int(env, "THREAD_MAX_MESSAGES", 10_000, 10, 10_000_000),
            model_http_port=_int(env, "MODEL_HTTP_PORT", 8090, 0, 65535),
            model_providers_file=env.get("MODEL_PROVIDERS_FILE", ""),
            min_output_tokens=_int(env, "MIN_OUTPUT_TOKENS", 16, 1, 100_000),
            model_max_body_bytes=_int(
                env, "MODEL_MAX_BODY_BYTES", 32 * 1024 * 1024, 1024, 1024 * 1024 * 1024
            ),
            model_call_max_s=_duration(env, "MODEL_CALL_MAX_DURATION", 600.0, 1, 3600),
            model_image_tokens=_int(env, "MODEL_IMAGE_TOKENS", 4_000, 1, 1_000_000),
            model_state_cache_s=_duration(env, "MODEL_STATE_CACHE", 1.0, 0, 2),
            call_log_retention_s=_duration(
                env, "CALL_LOG_RETENTION", 7 * 86_400.0, 1, 10 * 365 * 86_400
            ),
            call_log_max=_int(env, "CALL_LOG_MAX_PER_PROJECT", 50_000, 10, 10_000_000),
            model_gateway_addresses=env.get("MODEL_GATEWAY_ADDRESSES", ""),
            retention_sweep_s=_duration(env, "RETENTION_SWEEP_INTERVAL", 10.0, 0.05, 86_400),
            log_rpc_rate=_int(env, "LOG_RPC_RATE", 100, 0, 10_000_000),
            log_slow_rpc_s=_duration(env, "LOG_SLOW_RPC", 1.0, 0.001, 3600),
        )
