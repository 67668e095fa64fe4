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
        ({"THREAD_RETENTION": "7 days"}, "THREAD_RETENTION"),
        ({"THREAD_RETENTION": "7d3"}, "THREAD_RETENTION"),
        ({"AGENT_RETENTION": "0s"}, "AGENT_RETENTION"),
        ({"THREAD_MAX_MESSAGES": "5"}, "THREAD_MAX_MESSAGES"),
        ({"RETENTION_SWEEP_INTERVAL": "soon"}, "RETENTION_SWEEP_INTERVAL"),
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


def test_retention_defaults_and_human_durations() -> None:
    settings = Settings.from_env("thread_svc", env={})
    assert settings.thread_retention_s == 7 * 86_400 and settings.agent_retention_s == 30 * 86_400
    assert settings.thread_max_messages == 10_000 and settings.retention_sweep_s == 10
    for text, seconds in [("7d", 7 * 86_400), ("12h", 43_200), ("30s", 30), ("90", 90),
                          ("1.5", 1.5), ("15m", 900), ("2w", 14 * 86_400),
                          ("1d12h", 129_600), (" 12H ", 43_200)]:  # fmt: skip
        env = {"THREAD_RETENTION": text, "AGENT_RETENTION": text}
        parsed = Settings.from_env("thread_svc", env=env)
        assert parsed.thread_retention_s == parsed.agent_retention_s == seconds, text
