"""The per-RPC line: written straight as JSON, successful calls sampled above
LOG_RPC_RATE (and counted), failed and slow calls always written; and the trace ids a
process that records no spans still carries."""

from __future__ import annotations

import io

import orjson
from opentelemetry import trace

from services.common.logging import AccessLog
from services.common.settings import Settings
from services.common.telemetry import server_span


def lines(out: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def access_log(**env: str) -> tuple[AccessLog, io.StringIO]:
    out = io.StringIO()
    log = AccessLog()
    log.configure(Settings.from_env("probe_svc", env=env), out)
    return log, out


def test_successful_calls_past_the_rate_are_counted_and_failures_always_written() -> None:
    log, out = access_log(LOG_RPC_RATE="5", LOG_SLOW_RPC="250ms")
    for i in range(40):
        log.write("rpc", True, 0.001, method="/p.S/Ok", code="OK", call=i)
    log.write("rpc", False, 0.001, method="/p.S/Bad", code="INTERNAL")
    log.write("rpc", True, 0.3, method="/p.S/Slow", code="OK")  # slow: written past the rate
    written = lines(out)
    ok = [line for line in written if line["method"] == "/p.S/Ok"]
    assert 5 <= len(ok) <= 10  # at most the rate in each second the loop spanned
    failed = [line for line in written if line["code"] == "INTERNAL"]
    slow = [line for line in written if line["method"] == "/p.S/Slow"]
    assert len(failed) == 1 and len(slow) == 1
    # every call is accounted for: written, or counted in a later line's `unlogged`
    assert len(ok) + sum(line.get("unlogged", 0) for line in written) == 40
    line = failed[0]
    assert line["event"] == "rpc" and line["level"] == "info" and line["service"] == "probe_svc"
    assert line["timestamp"].endswith("Z") and line["duration_ms"] == 1.0


def test_rate_zero_writes_every_call_and_warning_level_writes_none() -> None:
    log, out = access_log(LOG_RPC_RATE="0")
    for _ in range(300):
        log.write("rpc", True, 0.0001, method="/p.S/Ok", code="OK")
    assert len(lines(out)) == 300
    quiet, quiet_out = access_log(LOG_LEVEL="warning")
    quiet.write("rpc", False, 0.1, method="/p.S/Bad", code="INTERNAL")
    assert quiet_out.getvalue() == ""


def test_without_an_exporter_a_call_keeps_the_callers_trace_or_gets_new_ids() -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    before = trace.get_current_span()
    span = server_span("/p.S/Call", {"traceparent": parent})
    context = trace.get_current_span().get_span_context()
    assert format(context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(context.span_id, "016x") == "b7ad6b7169203331"  # passed on unchanged
    assert not trace.get_current_span().is_recording()
    log, out = access_log()
    log.write("rpc", True, 0.001, method="/p.S/Call", code="OK")
    assert lines(out)[0]["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    span.end()
    assert trace.get_current_span() is before
    for header in ("", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"):
        span = server_span("/p.S/Call", {"traceparent": header} if header else {})
        fresh = trace.get_current_span().get_span_context()
        assert fresh.is_valid and fresh.trace_id != 0  # new random ids
        span.end()
