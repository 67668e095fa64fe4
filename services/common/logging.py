"""structlog setup: JSON lines by default, console rendering with LOG_FORMAT=console."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any, TextIO

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
    access_log.configure(settings, sys.stdout)


class AccessLog:
    """The one line per RPC (and per gateway request), written straight to the output as
    JSON, with the same fields as every other line (event, level, timestamp, service,
    trace ids) but none of structlog's per-line processor chain.

    Above LOG_RPC_RATE successful calls in a second, further successful calls are counted
    but not written (the next line written says how many in `unlogged`; the Prometheus
    series count every call). Failed calls and calls slower than LOG_SLOW_RPC are always
    written. Before `configure` (in-process tests) and with LOG_FORMAT=console every line
    goes through structlog as usual.
    """

    def __init__(self) -> None:
        self._out: TextIO | None = None
        self._enabled = True
        self._rate = 0
        self._slow_s = 0.0
        self._service = ""
        self._second = 0
        self._written = 0
        self._unlogged = 0
        self._fallback = structlog.get_logger("agentplane.access")

    def configure(self, settings: Settings, out: TextIO) -> None:
        self._out = None if settings.log_format == "console" else out
        self._enabled = getattr(logging, settings.log_level.upper()) <= logging.INFO
        self._rate = settings.log_rpc_rate
        self._slow_s = settings.log_slow_rpc_s
        self._service = settings.service_name

    def write(self, event: str, ok: bool, duration_s: float, **fields: Any) -> None:
        """One line for a call that took `duration_s`, unless it is an `ok` call past the
        rate of this second."""
        if not self._enabled:
            return
        if ok and self._rate and duration_s < self._slow_s:
            second = int(time.monotonic())
            if second != self._second:
                self._second, self._written = second, 0
            if self._written >= self._rate:
                self._unlogged += 1
                return
            self._written += 1
        fields["duration_ms"] = round(duration_s * 1000, 3)
        if self._unlogged:
            fields["unlogged"], self._unlogged = self._unlogged, 0
        if self._out is None:
            self._fallback.info(event, **fields)
            return
        fields["event"] = event
        fields["service"] = self._service
        fields["level"] = "info"
        fields["timestamp"] = _now_iso()
        _add_trace_ids(None, "", fields)
        self._out.write(orjson.dumps(fields, default=str).decode() + "\n")
        self._out.flush()


def _now_iso() -> str:
    """The time as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


access_log = AccessLog()


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
