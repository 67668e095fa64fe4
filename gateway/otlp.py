"""`POST /v1/traces` on the operators' gateway: OTLP/HTTP trace exports (protobuf or JSON
bodies, gzip accepted), passed to the usage service's `TraceService/Export` with the
exporter's own `authorization` header; the answer in the body's own encoding. This is
where the OpenTelemetry SDK's HTTP exporter points (`OTEL_EXPORTER_OTLP_ENDPOINT=
http://<gateway>:8080`).

OTLP/JSON writes trace and span ids in hex where protobuf's JSON mapping expects
base64; they are turned around before parsing.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from services.common import errors

PROTOBUF, JSON = "application/x-protobuf", "application/json"
ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def decode(
    body: bytes, content_type: str, encoding: str, limit: int
) -> trace_service_pb2.ExportTraceServiceRequest:
    """The export in a request body; INVALID_ARGUMENT naming what is wrong."""
    if encoding.strip().lower() == "gzip":
        body = _gunzip(body, limit)
    elif encoding.strip() not in ("", "identity"):
        raise errors.invalid_argument("content-encoding", "only gzip or none")
    kind = content_type.split(";")[0].strip().lower()
    if kind == PROTOBUF:
        try:
            return trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except Exception:  # protobuf's DecodeError, or worse on hostile bytes
            raise errors.invalid_argument("body", "not an OTLP ExportTraceServiceRequest") from None
    if kind == JSON:
        try:
            data = orjson.loads(body)
            _hex_ids_to_base64(data)
            return json_format.ParseDict(data, trace_service_pb2.ExportTraceServiceRequest(),
                                         ignore_unknown_fields=True)  # fmt: skip
        except (orjson.JSONDecodeError, json_format.ParseError, ValueError, TypeError) as exc:
            raise errors.invalid_argument("body", f"not OTLP JSON: {exc}") from None
    raise errors.invalid_argument("content-type", f"{PROTOBUF} or {JSON}")


def encode(
    reply: trace_service_pb2.ExportTraceServiceResponse, content_type: str
) -> tuple[bytes, str]:
    if content_type.split(";")[0].strip().lower() == JSON:
        return orjson.dumps(json_format.MessageToDict(reply)), JSON
    return reply.SerializeToString(), PROTOBUF


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate at most `limit` bytes (a small bomb must not become a big body)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise errors.invalid_argument("body", "not valid gzip") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise errors.invalid_argument("body", f"inflates past {limit} bytes")
    return out


def _hex_ids_to_base64(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ID_FIELDS and isinstance(value, str) and value:
                node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


__all__ = ["TraceServiceStub", "decode", "encode"]
