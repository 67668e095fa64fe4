"""The chassis around every RPC, server and client side.

Server side, `instrument` wraps each RPC method once, at registration, to do what no
servicer should repeat: continue the caller's trace, remember its credentials and deadline for peer
calls, stop the handler at its deadline, turn domain errors (and Redis outages) into
statuses with google.rpc details, hide anything unexpected behind INTERNAL, and write one
log line and the Prometheus series. Client side, peer calls forward all of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import errors
from services.common.auth import INTERNAL_HEADER, Guard, internal_proof
from services.common.context import CallContext, current_call
from services.common.logging import access_log, get_logger
from services.common.telemetry import RPC_LATENCY, RPC_TOTAL, recording, server_span, tracer
from services.common.validate import check_request

log = get_logger("agentplane.rpc")
T = TypeVar("T")
TRACE_HEADERS = frozenset(("traceparent", "tracestate", "baggage"))


class _Meter:
    """One RPC method's Prometheus children, made once (the counter's per status code)."""

    __slots__ = ("_counters", "_labels", "histogram")

    def __init__(self, service: str, method: str) -> None:
        self._labels = (service, method)
        self.histogram = RPC_LATENCY.labels(service, method)
        self._counters: dict[grpc.StatusCode, Any] = {}

    def count(self, code: grpc.StatusCode, duration_s: float) -> None:
        counter = self._counters.get(code)
        if counter is None:
            counter = self._counters[code] = RPC_TOTAL.labels(*self._labels, code.name)
        counter.inc()
        self.histogram.observe(duration_s)


class _RpcScope:
    """Everything that surrounds one RPC; used by both the unary and the stream wrappers."""

    __slots__ = (
        "_proof",
        "_span",
        "_start",
        "_token",
        "call",
        "code",
        "context",
        "guard",
        "meter",
        "method",
        "peer",
        "principal",
    )

    def __init__(
        self, method: str, meter: _Meter, context: grpc.aio.ServicerContext, guard: Guard
    ) -> None:
        self.method = method
        self.meter = meter
        self.context = context
        self.guard = guard
        self.code = grpc.StatusCode.OK
        self.principal = ""

    async def __aenter__(self) -> _RpcScope:
        # Everything the scope needs from the RPC's context is taken now, while the RPC is
        # surely alive: once a stream has ended (a client cancelled it), touching its
        # context is undefined behaviour in grpc's C core (seen: SIGSEGV under many
        # simultaneous cancellations).
        self._start = time.perf_counter()
        self.peer = self.context.peer() or ""
        authorization = proof = None
        carrier: dict[str, str] = {}
        for key, value in self.context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else None
            elif key == INTERNAL_HEADER:
                proof = value if isinstance(value, str) else None
            elif key in TRACE_HEADERS and isinstance(value, str):
                carrier[key] = value
        self._proof = proof
        remaining = self.context.time_remaining()
        self._span = server_span(self.method, carrier)
        self.call = CallContext(
            method=self.method,
            peer=self.peer,
            authorization=authorization,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        self._token = current_call.set(self.call)
        return self

    async def admit(self) -> None:
        """Authenticate and rate-limit the caller; inside the scope, so refusals are mapped."""
        call = self.call
        principal, internal = await self.guard.admit(
            call.authorization, self.method.rsplit("/", 1)[-1], self._proof
        )
        self.principal = principal.label
        current_call.set(
            CallContext(call.method, call.peer, call.authorization, call.deadline, principal,
                        internal)
        )  # fmt: skip

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is not None:
                await self._abort(exc)
            return False
        finally:
            duration = time.perf_counter() - self._start
            self.meter.count(self.code, duration)
            access_log.write(
                "rpc", self.code == grpc.StatusCode.OK, duration, method=self.method,
                code=self.code.name, peer=self.peer, principal=self.principal,
            )  # fmt: skip
            if isinstance(exc, GeneratorExit):
                # A stream closed from outside its task (grpc dropped it): the context
                # variables were set in that task's context and die with it; only the
                # span is ended here.
                self._span.abandon()
            else:
                current_call.reset(self._token)
                self._span.end()

    async def _abort(self, exc: BaseException) -> None:
        """Map the exception to a status and abort; AbortError passes through unchanged."""
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            return
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            # The RPC is over (cancelled, or its stream closed by grpc): nothing to send,
            # and its context must not be touched any more.
            self.code = grpc.StatusCode.CANCELLED
            return
        if isinstance(exc, TimeoutError) and self._deadline_passed():
            # grpc itself ends a call whose deadline passed (the caller already has its
            # DEADLINE_EXCEEDED); sending a status on an ended call fails, so end quietly.
            self.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise asyncio.CancelledError from None
        error = self._as_service_error(exc)
        self.code = error.code
        self._span.fail(error.message)
        await self.context.abort_with_status(error.to_status())

    @staticmethod
    def _deadline_passed() -> bool:
        call = current_call.get()
        remaining = None if call is None else call.time_remaining()
        return remaining is not None and remaining < 0.01

    def _as_service_error(self, exc: BaseException) -> errors.ServiceError:
        if isinstance(exc, errors.ServiceError):
            return exc
        if isinstance(exc, TimeoutError):
            return errors.ServiceError(
                "deadline exceeded", reason="DEADLINE_EXCEEDED",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            )  # fmt: skip
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            log.warning("redis unavailable", method=self.method, error=str(exc))
            return errors.unavailable("storage is unavailable, retry later", "STORAGE_UNAVAILABLE")
        if isinstance(exc, RedisOutOfMemoryError) or (
            isinstance(exc, RedisResponseError) and str(exc).startswith("OOM")
        ):
            log.error("redis is out of memory; writes are refused", method=self.method)
            return errors.ServiceError(
                "storage is full (Redis reached maxmemory): nothing was written; writes are "
                "refused until an operator frees memory or raises the limit",
                reason="STORAGE_FULL", code=grpc.StatusCode.UNAVAILABLE,
            )  # fmt: skip
        if isinstance(exc, grpc.aio.AioRpcError):
            # A peer's refusal passes through with its code; its message is the peer's own.
            return errors.ServiceError(
                exc.details() or exc.code().name, reason="PEER_" + exc.code().name,
                code=exc.code(),
            )  # fmt: skip
        span_context = trace.get_current_span().get_span_context()
        trace_id = format(span_context.trace_id, "032x")
        log.error("unexpected error", method=self.method, exc_info=exc, trace_id=trace_id)
        return errors.ServiceError(
            f"internal error (trace {trace_id})", reason="INTERNAL", code=grpc.StatusCode.INTERNAL
        )


STREAM_OPEN_HEADER = "x-agentplane-stream"


class OpenStream:
    """A server stream that has passed its checks: `active` while the RPC goes on and the
    process is not stopping. A handler's loop checks it between reads, so a stream whose
    caller went away stops even when grpc could not interrupt it (seen: a cancelled
    inbox stream's loop kept reading and took deliveries meant for live consumers); and a
    blocking read through `unless_stopping` is abandoned the moment either happens."""

    __slots__ = ("_gone", "_stopping", "_task")

    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._gone = asyncio.Event()  # the RPC ended (its caller went, or it finished)
        self._task = asyncio.current_task()  # the handler's

    def _end(self, _context: object) -> None:
        self._gone.set()

    @property
    def active(self) -> bool:
        # grpc tells a handler its caller went by cancelling its task, once. A caller that
        # goes within moments of the stream's opening can have that one cancellation
        # swallowed by an await below us (seen: 199 of 200 inbox streams cancelled right
        # after their first metadata kept their leases, renewing them every second); the
        # task still counts the request, so it is read here too.
        task = self._task
        return not (
            self._gone.is_set()
            or self._stopping.is_set()
            or (task is not None and task.cancelling() > 0)
        )

    async def unless_stopping(self, work: Awaitable[T], empty: T) -> T:
        """`work` (a blocking read), or `empty` at once when the process starts stopping
        or the caller goes: the handler then ends by itself, its cleanup (an inbox lease
        given back) running at once — while the server drains and Redis is still there,
        or while the caller's consumer name would otherwise stay taken."""
        if not self.active:
            if asyncio.iscoroutine(work):
                work.close()  # never started: nothing to cancel
            return empty
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the stream itself was cancelled: so is its read
            task.cancel()
            raise
        finally:
            stop.cancel()
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()  # an entry read but not yet handed over stays pending: redelivered
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return empty


async def stream_open(
    context: grpc.aio.ServicerContext,
    stopping: asyncio.Event,
    headers: tuple[tuple[str, str], ...] = (),
) -> OpenStream:
    """Called by a server-streaming handler once its checks have passed: the initial
    metadata (with any `headers`) goes out at once, marked, so a caller (the gateway) can
    tell a refused stream (status, no mark) from an open one still waiting for its first
    event; and the stream learns (a done callback, registered while the RPC is surely
    alive) when it ends."""
    stream = OpenStream(stopping)
    context.add_done_callback(stream._end)
    await context.send_initial_metadata(((STREAM_OPEN_HEADER, "open"), *headers))
    return stream


def wrap_unary(
    service: str,
    method: str,
    behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    guard: Guard,
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    meter = _Meter(service, method)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _RpcScope(method, meter, context, guard) as scope:
            await scope.admit()
            _admissible(request)
            remaining = context.time_remaining()
            if remaining is None:  # no deadline: no timer to arm
                return await behavior(request, context)
            async with asyncio.timeout(remaining):
                return await behavior(request, context)

    return handle


def wrap_stream(
    service: str,
    method: str,
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    guard: Guard,
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    meter = _Meter(service, method)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _RpcScope(method, meter, context, guard) as scope:
            await scope.admit()
            _admissible(request)
            async for item in behavior(request, context):
                yield item

    return handle


MALFORMED = object()  # what a request that is not valid protobuf deserializes to


def _deserializer(message_class: Any) -> Callable[[bytes], Any]:
    """Parse a request; bytes that are not a valid message become MALFORMED, which the
    wrapper answers with INVALID_ARGUMENT (grpc itself would answer UNKNOWN)."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or nesting past protobuf's recursion limit
            return MALFORMED

    return parse


def _admissible(request: Any) -> None:
    if request is MALFORMED:
        raise errors.invalid_argument("request", "is not a valid protobuf message of this RPC")
    if isinstance(request, Message):
        check_request(request)


def register(
    server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor, service_label: str,
    guard: Guard,
) -> None:  # fmt: skip
    """Serve `service` from `servicer`, each RPC method wrapped with the chassis behaviour.

    The handlers are built here from the service's descriptor, once, rather than by the
    generated `add_*_to_server` plus a grpc interceptor, which would build a new handler
    on every call; health and reflection, registered separately, stay unobserved.
    """
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        full_name = f"/{service.full_name}/{method.name}"
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make, wrap = (
            (grpc.unary_stream_rpc_method_handler, wrap_stream)
            if method.server_streaming
            else (grpc.unary_unary_rpc_method_handler, wrap_unary)
        )
        handlers[method.name] = make(
            wrap(service_label, full_name, behavior, guard),
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _forwarded(details: grpc.aio.ClientCallDetails, secret: str) -> grpc.aio.ClientCallDetails:
    """The call details with the current caller's token, trace context and deadline added,
    and the proof that a service forwards them (see auth.internal_proof)."""
    call = current_call.get()
    metadata = _forwarded_metadata(list(details.metadata or ()), call, secret)
    timeout = details.timeout
    remaining = call.time_remaining() if call is not None else None
    if remaining is not None:
        timeout = remaining if timeout is None else min(timeout, remaining)
    return grpc.aio.ClientCallDetails(
        details.method, timeout, grpc.aio.Metadata(*metadata), details.credentials,
        details.wait_for_ready,
    )  # fmt: skip


def _forwarded_metadata(
    metadata: list[tuple[str, Any]], call: CallContext | None, secret: str
) -> list[tuple[str, Any]]:
    """The caller's token (unless the call sets its own), the internal proof, and the W3C
    trace context of the current span."""
    given = next((v for k, v in metadata if k == "authorization"), None)
    if given is None and call is not None and call.authorization:
        given = call.authorization
        metadata.append(("authorization", given))
    if secret and isinstance(given, str):
        metadata.append((INTERNAL_HEADER, internal_proof(secret, given)))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata.extend(carrier.items())
    return metadata


class ForwardingUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Peer unary calls: a client span, and the caller's token, trace and deadline."""

    def __init__(self, secret: str = "") -> None:
        self._secret = secret

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        if not recording():
            call = await continuation(_forwarded(client_call_details, self._secret), request)
            await call
            return call
        name = client_call_details.method
        method = name.decode() if isinstance(name, bytes) else name
        with tracer().start_as_current_span(method, kind=trace.SpanKind.CLIENT):
            call = await continuation(_forwarded(client_call_details, self._secret), request)
            await call
            return call


class ForwardingStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):
    """Peer server-streaming calls: the caller's token, trace and deadline."""

    def __init__(self, secret: str = "") -> None:
        self._secret = secret

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_forwarded(client_call_details, self._secret), request)
