"""`python -m gateway.models`: the model gateway on MODEL_HTTP_PORT (default 8090)."""

from __future__ import annotations

import sys

from gateway.models.app import ModelsApp
from gateway.models.providers import ProvidersError, load
from gateway.server import listen, make_server
from services.common import registry
from services.common.logging import configure_logging, get_logger
from services.common.settings import Settings, SettingsError
from services.common.telemetry import configure_telemetry


def main() -> int:
    try:
        settings = Settings.from_env(
            registry.MODELS.label, default_metrics_port=registry.MODELS.metrics_port
        )
        catalog = load(settings.model_providers_file)
    except (SettingsError, ProvidersError) as exc:
        print(f"model gateway: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    configure_telemetry(settings)
    log = get_logger("agentplane.models")
    if not catalog.providers:
        log.warning("no MODEL_PROVIDERS_FILE: every model is answered 404")
    try:
        sock = listen(settings, settings.model_http_port)
    except OSError as exc:
        print(
            f"model gateway: cannot listen on port {settings.model_http_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    log.info(
        "listening", port=sock.getsockname()[1], host=settings.bind_host,
        providers=[p.name for p in catalog.providers],
    )  # fmt: skip
    make_server(settings, ModelsApp(settings, catalog)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
