"""`python -m gateway`: the REST gateway on HTTP_PORT (default 8080, see the registry)."""

from __future__ import annotations

import sys

from gateway.app import create_app
from gateway.server import listen, make_server
from services.common import registry
from services.common.logging import configure_logging, get_logger
from services.common.settings import Settings, SettingsError
from services.common.telemetry import configure_telemetry


def main() -> int:
    try:
        settings = Settings.from_env(
            registry.GATEWAY.label, default_metrics_port=registry.GATEWAY.metrics_port
        )
    except SettingsError as exc:
        print(f"gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    configure_telemetry(settings)
    try:
        sock = listen(settings)
    except OSError as exc:
        print(f"gateway: cannot listen on port {settings.http_port}: {exc}", file=sys.stderr)
        return 1
    get_logger("agentplane.gateway").info(
        "listening", port=sock.getsockname()[1], host=settings.bind_host
    )
    make_server(settings, create_app(settings)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
