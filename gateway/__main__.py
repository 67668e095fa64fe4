"""`python -m gateway`: the REST gateway on HTTP_PORT (default 8080)."""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import create_app
from services.common.logging import configure_logging
from services.common.settings import Settings, SettingsError
from services.common.telemetry import configure_telemetry


def main() -> int:
    try:
        settings = Settings.from_env("gateway", default_metrics_port=9104)
    except SettingsError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    configure_telemetry(settings)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.bind_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,  # the gateway writes its own access line, with the trace id
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=int(settings.grace_period_s),
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
