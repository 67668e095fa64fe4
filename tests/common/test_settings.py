"""Settings come from the environment and a bad value is named clearly at start-up."""

from __future__ import annotations

import pytest

from services.common.settings import Settings, SettingsError


def test_defaults_follow_the_spec() -> None:
    settings = Settings.from_env("agent_svc", default_grpc_port=50051, env={})
    assert settings.grpc_port == 50051
    assert settings.redis_url == "redis://localhost:6379/0"
    assert (settings.agent_svc_addr, settings.thread_svc_addr, settings.usage_svc_addr) == (
        "localhost:50051",
        "localhost:50052",
        "localhost:50053",
    )
    assert settings.log_format == "json" and not settings.redis_cluster
    assert not settings.tls_enabled


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GRPC_PORT": "eighty"}, "GRPC_PORT"),
        ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"USAGE_SVC_ADDR": "nohost"}, "USAGE_SVC_ADDR"),
        ({"TLS_CERT": "/tmp/x.pem"}, "TLS_"),
        ({"REDIS_TIMEOUT_SECONDS": "-1"}, "REDIS_TIMEOUT_SECONDS"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env("agent_svc", env=env)


def test_cluster_and_console_switches() -> None:
    settings = Settings.from_env(
        "usage_svc", env={"REDIS_CLUSTER": "true", "LOG_FORMAT": "console", "GRPC_PORT": "0"}
    )
    assert settings.redis_cluster and settings.log_format == "console" and settings.grpc_port == 0
