"""structlog setup: JSON lines by default, console rendering with LOG_FORMAT=console."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from opentelemetry import trace

from services.common.settings import Settings


def _add_trace_ids(
    _logger: object, _method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Stamp the current trace and span ids on every line, so logs join traces."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event.setdefault("span_id", format(span_context.span_id, "016x"))
    return event


def _dumps(event: object, **_kw: object) -> str:
    return orjson.dumps(event, default=str).decode()


def configure_logging(settings: Settings) -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process."""
    level = getattr(logging, settings.log_level.upper())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer()
        if settings.log_format == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, force=True)
    structlog.contextvars.bind_contextvars(service=settings.service_name)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
