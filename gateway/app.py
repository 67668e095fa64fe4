"""The REST gateway: HTTP/JSON in, gRPC to the services, JSON or server-sent events out."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.protobuf import json_format, message_factory
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse

from gateway import otlp
from gateway.compat import COMPAT, Compat, Paging, legacy_paging
from gateway.openapi import build_openapi
from gateway.routes import Route, build_routes, match
from gateway.server import lifespan
from services.common import codec, errors, registry
from services.common.auth import Authenticator
from services.common.clients import open_channel
from services.common.interceptors import STREAM_OPEN_HEADER, TRACE_HEADERS
from services.common.limits import HTTP_MAX_BODY_BYTES as MAX_BODY_BYTES
from services.common.logging import access_log, get_logger
from services.common.peers import AgentClient
from services.common.settings import Settings
from services.common.telemetry import server_span

log = get_logger("agentplane.gateway")
HTTP_BODY = "google.api.HttpBody"

HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}  # fmt: skip


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def error_envelope(
    code: grpc.StatusCode, message: str, details: list[Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    status = HTTP_STATUS.get(code, 500)
    headers: dict[str, str] = {}
    delay = next(
        (d.get("retry_delay") for d in details if d.get("@type", "").endswith("RetryInfo")),
        None,
    )
    if isinstance(delay, str):
        # Only when the service said when a retry can succeed (a rate limit); an exhausted
        # budget is 429 too, but waiting does not help, so it carries no Retry-After.
        headers["Retry-After"] = str(max(1, math.ceil(float(delay.rstrip("s")))))
    body = {"error": {"code": status, "status": code.name, "message": message, "details": details}}
    return status, body, headers


def _details_from_status(status: status_pb2.Status) -> list[Any]:
    return [
        json_format.MessageToDict(detail, preserving_proto_field_name=True)
        for detail in status.details
    ]


def rpc_error_parts(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, list[Any]]:
    details: list[Any] = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            details = _details_from_status(status_pb2.Status.FromString(value))
    return exc.code(), exc.details() or exc.code().name, details


def service_error_parts(exc: errors.ServiceError) -> tuple[grpc.StatusCode, str, list[Any]]:
    return exc.code, exc.message, _details_from_status(exc.to_proto())


class BodyTooLarge(Exception):
    """A request body past HTTP_MAX_BODY_BYTES: 413, and the connection is closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes")


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.routes = build_routes()
        self.openapi = build_openapi(self.routes)
        # Channels are bound to the serving event loop: open() makes them, at start-up.
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[tuple[str, int], Any] = {}
        self.auth = Authenticator(settings.admin_token, Authenticator.no_keys, 0.0)
        self.streams: set[Any] = set()  # the upstream calls of open event streams

    def end_streams(self) -> None:
        """At shutdown: end every event stream now (clients reconnect, to another replica,
        resuming from their last event id) instead of holding the stop for the grace
        period — streams never end on their own."""
        for call in list(self.streams):
            call.cancel()

    async def open(self) -> None:
        """Channels to the backends, once, on the serving event loop. The gateway sets
        token, trace context and deadline on each call itself, so its channels skip the
        forwarding interceptor (an interceptor costs a task per call)."""
        settings = self.settings
        self.channels = {
            service.name: open_channel(settings, settings.peer_address(service), forwarding=False)
            for service in registry.SERVICES
        }
        self._calls.clear()
        # Callers are authenticated here, before their body is read (the services check
        # again); API keys are looked up with the agent service, cached like everywhere.
        agents = AgentClient(self.channels["agent"], settings.auth_cache_s)
        self.auth = Authenticator(settings.admin_token, agents.principal, settings.auth_cache_s)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    def _callable(self, route: Route) -> Any:
        key = (route.rpc_path, route.streaming)
        if key not in self._calls:
            request_cls = message_factory.GetMessageClass(route.method.input_type)
            response_cls = message_factory.GetMessageClass(route.method.output_type)
            channel = self.channels[route.backend]
            make = channel.unary_stream if route.streaming else channel.unary_unary
            self._calls[key] = make(
                route.rpc_path,
                request_serializer=request_cls.SerializeToString,
                response_deserializer=response_cls.FromString,
            )
        return self._calls[key]

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        carrier = {k: v for k, v in request.headers.items() if k in TRACE_HEADERS}
        route, values, known = match(self.routes, request.method, request.url.path)
        template = route.template if route else "-"
        span = server_span(f"{request.method} {template}", carrier)
        try:
            response = await self._answer(request, route, values, known)
        finally:
            span.end()
        access_log.write(
            "http", response.status_code < 400, time.perf_counter() - started,
            method=request.method, route=template, status=response.status_code,
        )  # fmt: skip
        return response

    async def _answer(
        self, request: Request, route: Route | None, values: dict[str, str], known: bool
    ) -> Response:
        try:
            if route is None and known:
                message = f"{request.method} is not allowed on {request.url.path}"
                error = {"code": 405, "status": "METHOD_NOT_ALLOWED", "message": message}
                response = json_response({"error": {**error, "details": []}}, 405)
            elif route is None:
                response = self._error(
                    grpc.StatusCode.NOT_FOUND,
                    f"no route {request.method} {request.url.path}",
                    [],
                )
            else:
                await self.auth.authenticate(request.headers.get("authorization"))
                response = await self._call(route, values, request)
        except BodyTooLarge as exc:
            response = json_response(
                {"error": {"code": 413, "status": "INVALID_ARGUMENT", "message": str(exc),
                           "details": []}},
                413, {"Connection": "close"},
            )  # fmt: skip
        except errors.ServiceError as exc:
            response = self._error(*service_error_parts(exc))
        except grpc.aio.AioRpcError as exc:
            response = self._error(*rpc_error_parts(exc))
        except Exception as exc:  # nothing unexpected reaches the caller
            trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
            log.error("gateway error", exc_info=exc, trace_id=trace_id)
            response = self._error(
                grpc.StatusCode.INTERNAL, f"internal error (trace {trace_id})", []
            )
        return response

    def _error(self, code: grpc.StatusCode, message: str, details: list[Any]) -> Response:
        status, body, headers = error_envelope(code, message, details)
        if status == 401:
            headers["Connection"] = "close"  # a body the caller may still be sending is unread
        return json_response(body, status, headers)

    async def _call(self, route: Route, values: dict[str, str], request: Request) -> Response:
        compat = COMPAT.get((route.verb, route.template), Compat())
        data, paging = self._query_fields(route, compat, values, request)
        resume = route.resume_field
        if resume and (last := request.headers.get("last-event-id")):
            data.setdefault(f"after_{resume}", last)  # an explicit query parameter wins
        if route.body:
            await self._body_fields(route, values, request, data)
        message = codec.from_json(data, message_factory.GetMessageClass(route.method.input_type)())
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # W3C trace context of this request's span
        metadata = list(carrier.items())
        if authorization := request.headers.get("authorization"):
            metadata.append(("authorization", authorization))
        call = self._callable(route)
        if route.streaming:
            stream = call(message, metadata=metadata)
            await self._opened(stream)
            if route.method.output_type.full_name == HTTP_BODY:
                return await self._download(stream)
            return EventStream(stream, resume, self.settings.sse_keepalive_s, self.streams)
        reply = await call(message, metadata=metadata, timeout=self.settings.peer_timeout_s)
        answer = codec.to_json(reply)
        if compat.reshape is not None:
            answer = compat.reshape(answer, paging, values)
        return json_response(answer, compat.status)

    @staticmethod
    def _query_fields(
        route: Route, compat: Compat, values: dict[str, str], request: Request
    ) -> tuple[dict[str, Any], Paging]:
        """The request's fields from the compatibility table, the path and the query."""
        data: dict[str, Any] = {}
        query = dict(request.query_params)
        paging = Paging(0, 0, 0)
        if compat.paging:
            paging, fields = legacy_paging(compat.paging, query)
            data.update(fields)
            for name in ("limit", "offset", "page"):
                query.pop(name, None)
        data.update(compat.fixed)
        for name, value in values.items():
            _assign(data, name, value)
        for name in query:
            field = _field_at(route.method.input_type, name)
            if field is None:
                raise errors.invalid_argument(name, "is not a parameter of this route")
            converted = [
                codec.query_value(field, v, name) for v in request.query_params.getlist(name)
            ]
            _assign(data, name, converted if codec.is_repeated(field) else converted[-1])
        return data, paging

    async def _body_fields(
        self, route: Route, values: dict[str, str], request: Request, data: dict[str, Any]
    ) -> None:
        """The body's fields added to `data` (path variables win over the same keys)."""
        body = await self._body(request)
        if route.body == "*":
            if not isinstance(body, dict):
                raise errors.invalid_argument("body", "must be a JSON object")
            data.update({k: v for k, v in body.items() if k not in values})
            return
        data[route.body] = body
        if (
            route.verb == "PATCH"
            and "update_mask" in route.method.input_type.fields_by_name
            and "update_mask" not in request.query_params
            and isinstance(body, dict)
        ):
            # A PATCH changes exactly the fields present in its body.
            data["update_mask"] = ",".join(body.keys())

    async def _body(self, request: Request) -> Any:
        """The JSON body, read only up to the limit."""
        raw = await self._raw(request)
        if not raw.strip():
            return {}
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid_argument("body", f"malformed JSON: {exc}") from None

    async def _raw(self, request: Request) -> bytes:
        """The body, read only up to the limit: a declared Content-Length past it is
        refused before any byte is read, a chunked body as soon as it passes it."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise BodyTooLarge(MAX_BODY_BYTES)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BodyTooLarge(MAX_BODY_BYTES)
            chunks.append(chunk)
        return b"".join(chunks)

    async def traces(self, request: Request) -> Response:
        """`POST /v1/traces`: an OTLP/HTTP export, counted by the usage service
        (gateway/otlp.py)."""
        started = time.perf_counter()
        carrier = {k: v for k, v in request.headers.items() if k in TRACE_HEADERS}
        span = server_span("POST /v1/traces", carrier)
        try:
            response = await self._traces(request)
        except BodyTooLarge as exc:
            error = {"code": 413, "status": "INVALID_ARGUMENT", "message": str(exc), "details": []}
            response = json_response({"error": error}, 413)
        except errors.ServiceError as exc:
            response = self._error(*service_error_parts(exc))
        except grpc.aio.AioRpcError as exc:
            response = self._error(*rpc_error_parts(exc))
        finally:
            span.end()
        access_log.write(
            "http", response.status_code < 400, time.perf_counter() - started,
            method="POST", route="/v1/traces", status=response.status_code,
        )  # fmt: skip
        return response

    async def _traces(self, request: Request) -> Response:
        authorization = request.headers.get("authorization")
        await self.auth.authenticate(authorization)
        content_type = request.headers.get("content-type", "")
        encoding = request.headers.get("content-encoding", "")
        export = otlp.decode(await self._raw(request), content_type, encoding, MAX_BODY_BYTES)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # this request's span, for the service's
        metadata = [*carrier.items(), ("authorization", authorization or "")]
        stub = otlp.TraceServiceStub(self.channels["usage"])
        reply = await stub.Export(export, metadata=metadata, timeout=self.settings.peer_timeout_s)
        body, kind = otlp.encode(reply, content_type)
        return Response(body, 200, media_type=kind)

    async def _opened(self, stream: Any) -> None:
        """Wait until the service has accepted the stream: a refusal known before the first
        event (401, 403, 404, 409...) becomes the HTTP status, not an `event: error`."""
        try:
            async with asyncio.timeout(self.settings.peer_timeout_s):
                initial = await stream.initial_metadata()
                if any(key == STREAM_OPEN_HEADER for key, _ in initial or ()):
                    return
                await stream.read()  # ended before opening: raises its error, if any
        except TimeoutError:
            stream.cancel()
            raise errors.ServiceError(
                "the service did not open the stream in time", reason="DEADLINE_EXCEEDED",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None  # fmt: skip
        except BaseException:
            stream.cancel()
            raise

    async def _download(self, stream: Any) -> Response:
        """A stream of google.api.HttpBody: its chunks' bytes as the response body, the
        first chunk's content type, and the service's "x-http-*" metadata as headers."""
        headers = {
            key.removeprefix("x-http-"): value
            for key, value in await stream.initial_metadata() or ()
            if key.startswith("x-http-")
        }
        first = await stream.read()
        if first is grpc.aio.EOF:
            return Response(b"", headers=headers)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                chunk = first
                while chunk is not grpc.aio.EOF:  # (read() only: grpc forbids mixing it
                    yield chunk.data  # with iteration on one call)
                    chunk = await stream.read()
            finally:
                stream.cancel()

        return StreamingResponse(chunks(), media_type=first.content_type, headers=headers)

    async def healthz(self, _request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        async def check(name: str) -> tuple[str, str]:
            try:
                reply = await health_pb2_grpc.HealthStub(self.channels[name]).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
                return name, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                return name, exc.code().name

        states = dict(await asyncio.gather(*(check(n) for n in self.channels)))
        ready = all(v == "SERVING" for v in states.values())
        return json_response({"ready": ready, "backends": states}, 200 if ready else 503)

    async def openapi_json(self, _request: Request) -> Response:
        return json_response(self.openapi)

    async def docs(self, _request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE, headers=DOCS_HEADERS)


def _field_at(descriptor: Any, dotted: str) -> Any:
    field = None
    for part in dotted.split("."):
        if descriptor is None:
            return None
        field = descriptor.fields_by_name.get(part)
        if field is None:
            return None
        descriptor = field.message_type
    return field


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


UI = Path(__file__).with_name("ui")
UI_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
            ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
# The console talks to this origin only: its own scripts and styles, the REST API.
UI_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


DOCS_STYLE = """body{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}
code{background:#eee}
td{padding:.2rem .6rem;border-bottom:1px solid #ddd;vertical-align:top}"""
DOCS_SCRIPT = """fetch('/openapi.json').then(r=>r.json()).then(spec=>{
const t=document.getElementById('ops');
const code=(text)=>{const c=document.createElement('code');c.textContent=text;return c;};
for(const [path,ops] of Object.entries(spec.paths)){for(const [verb,op] of Object.entries(ops)){
const row=t.insertRow();row.insertCell().append(code(verb.toUpperCase()));
row.insertCell().append(code(path));row.insertCell().textContent=op.summary||'';}}});"""
DOCS_PAGE = f"""<!doctype html><html><head><meta charset="utf-8"><title>agentplane API</title>
<style>{DOCS_STYLE}</style></head>
<body><h1>agentplane REST API</h1><p>Machine-readable: <a href="/openapi.json">/openapi.json</a>
(OpenAPI 3.1).</p><table id="ops"></table><script>{DOCS_SCRIPT}</script></body></html>"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# The console's headers, with the docs page's own inline script and style allowed by hash.
DOCS_HEADERS = {
    **UI_HEADERS,
    "content-security-policy": (
        f"default-src 'none'; script-src {_csp_hash(DOCS_SCRIPT)}; "
        f"style-src {_csp_hash(DOCS_STYLE)}; connect-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
}


class Console:
    """The operator console (SPEC §11): static files from gateway/ui, read once."""

    def __init__(self, folder: Path = UI) -> None:
        self.files = {
            f"/ui/{path.name}": (path.read_bytes(), UI_TYPES[path.suffix])
            for path in sorted(folder.iterdir())
            if path.suffix in UI_TYPES
        }
        self.files["/ui/"] = self.files["/ui/index.html"]

    async def serve(self, request: Request) -> Response:
        path = request.url.path
        if path == "/ui":
            return Response(status_code=308, headers={"location": "/ui/", **UI_HEADERS})
        found = self.files.get(path)
        if found is None:
            return Response(b"not found", 404, headers=UI_HEADERS, media_type="text/plain")
        body, media_type = found
        return Response(body, headers=UI_HEADERS, media_type=media_type)


class EventStream(Response):
    """A gRPC server stream as server-sent events: one `data:` line per message (with an
    `id:` line when the stream can resume from it), errors as `event: error`, and a
    `: keep-alive` comment after every `keepalive_s` of silence so that proxies and load
    balancers keep an idle stream open.

    The upstream call lives exactly as long as the HTTP client: a task waits for the
    client's `http.disconnect` and cancels the call at once, even while nothing is being
    sent (a disconnect noticed only at the next write would leave an idle inbox stream,
    and its consumer lease, open upstream indefinitely)."""

    HEADERS = (
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    )  # and no content-length: the body is as long as the stream

    def __init__(self, call: Any, resume: str, keepalive_s: float, live: set[Any]) -> None:
        self.status_code = 200
        self.raw_headers = list(self.HEADERS)
        self.background = None
        self._call = call
        self._resume = resume
        self._keepalive_s = keepalive_s
        self._live = live  # the gateway's open streams (ended together at shutdown)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code,
             "headers": self.raw_headers}
        )  # fmt: skip
        watcher = asyncio.create_task(self._until_disconnect(receive))
        self._live.add(self._call)
        try:
            async for chunk in self._chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went while we wrote
            pass
        finally:
            self._live.discard(self._call)
            watcher.cancel()
            self._call.cancel()

    async def _until_disconnect(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._call.cancel()

    async def _chunks(self) -> AsyncIterator[bytes]:
        call, resume = self._call, self._resume
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({pending}, timeout=self._keepalive_s)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                item, pending = pending.result(), None
                if item is grpc.aio.EOF:
                    return
                event_id = getattr(item, resume) if resume else ""
                head = b"id: " + event_id.encode() + b"\n" if event_id else b""
                yield head + b"data: " + orjson.dumps(codec.to_json(item)) + b"\n\n"
        except asyncio.CancelledError:
            if call.cancelled():  # the client went: the watcher cancelled the call
                return
            raise
        except grpc.aio.AioRpcError as exc:
            _, body, _ = error_envelope(*rpc_error_parts(exc))
            yield b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
        finally:
            if pending is not None:
                pending.cancel()


class GatewayApp:
    """The ASGI application: a fixed handful of operational paths, then the routing
    table. Plain ASGI rather than a framework router: every request goes through here, and
    the gateway's whole budget is a fraction of a millisecond."""

    def __init__(self, settings: Settings) -> None:
        self.gateway = Gateway(settings)
        self.console = Console()
        self._fixed = {
            "/healthz": self.gateway.healthz,
            "/readyz": self.gateway.readyz,
            "/openapi.json": self.gateway.openapi_json,
            "/docs": self.gateway.docs,
        }

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        fixed = self._fixed.get(scope["path"])
        if fixed is not None and scope["method"] in ("GET", "HEAD"):
            response = await fixed(request)
        elif scope["path"] == "/v1/traces" and scope["method"] == "POST":
            response = await self.gateway.traces(request)
        elif scope["path"].startswith("/ui") and scope["method"] in ("GET", "HEAD"):
            response = await self.console.serve(request)
        else:
            response = await self.gateway.handle(request)
        await response(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        await lifespan(receive, send, self.gateway.open, self.gateway.close)

    def end_streams(self) -> None:
        """Called by the server when it starts to stop (see gateway/server.py)."""
        self.gateway.end_streams()


def create_app(settings: Settings) -> GatewayApp:
    return GatewayApp(settings)
