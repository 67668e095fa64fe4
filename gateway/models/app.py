"""The model gateway's ASGI application: who calls, admission, forwarding, settling.

A call, in order: the agentplane API key names the project and the agent (an agent key;
401 without one, 403 for any other kind); the agent must be neither PAUSED nor TERMINATED
and the thread named by `Agentplane-Thread` active and of the same project (checked with
the services, cached MODEL_STATE_CACHE, 1 s); the body is parsed and its model routed to a
provider (404 when none serves it); then one ReserveBudget holds the call's ceiling —
an upper bound of its prompt plus its output cap — across every covering HARD budget
and limit, atomically, accepting less down to a minimal answer, and the output cap sent
upstream is what the hold allows. Only then does a byte go upstream. The answer passes
through as it comes (a stream event by event); its usage, as the provider reports it,
settles the reservation with one RecordUsage that also logs the call, exactly once
(the usage id is the call's id). A call cut before the provider reported its usage is
recorded as an estimate (the prompt bound plus the text streamed), flagged; a replica
that dies mid-call leaves its reservation to be charged in full when it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import orjson
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from ulid import ULID

from agentplane.agent.v1 import agent_pb2, agent_service_pb2, agent_service_pb2_grpc
from agentplane.thread.v1 import thread_pb2, thread_service_pb2, thread_service_pb2_grpc
from agentplane.usage.v1 import usage_pb2, usage_service_pb2, usage_service_pb2_grpc
from gateway.models import echo, wire
from gateway.models.providers import Catalog, Provider
from gateway.models.upstream import Upstream, UpstreamFailed, UpstreamTimeout
from gateway.server import lifespan
from services.common import errors, registry
from services.common.auth import AGENT, INTERNAL_HEADER, Authenticator, Principal, internal_proof
from services.common.clients import open_channel
from services.common.convert import timestamp
from services.common.errors import details_of
from services.common.interceptors import TRACE_HEADERS
from services.common.logging import access_log, get_logger
from services.common.peers import AgentClient
from services.common.settings import Settings
from services.common.telemetry import (
    MODEL_CALLS,
    MODEL_COST,
    MODEL_DURATION,
    MODEL_REFUSALS,
    MODEL_TOKENS,
    MODEL_TTFT,
    server_span,
)

log = get_logger("agentplane.models")
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
OK, REFUSED = usage_pb2.MODEL_CALL_OUTCOME_OK, usage_pb2.MODEL_CALL_OUTCOME_REFUSED
UPSTREAM_ERROR = usage_pb2.MODEL_CALL_OUTCOME_UPSTREAM_ERROR
CANCELLED, TIMEOUT = usage_pb2.MODEL_CALL_OUTCOME_CANCELLED, usage_pb2.MODEL_CALL_OUTCOME_TIMEOUT
SETTLE_ATTEMPTS = 6
SETTLE_GRACE_S = 10.0
SETTLE_CONCURRENCY = 64
THREAD_HEADER = "agentplane-thread"


class Refused(Exception):
    """A call answered by the gateway itself, in the client's wire format."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None,
        retry_after: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.retry_after = param, retry_after


@dataclass(slots=True)
class Caller:
    principal: Principal
    metadata: tuple[tuple[str, str], ...]

    @property
    def project(self) -> str:
        return self.principal.project_id

    @property
    def agent(self) -> str:
        return self.principal.subject


@dataclass(slots=True)
class Call:
    """One call's state, from arrival to settling."""

    call_id: str
    operation: str
    api: str
    started: float
    start_ms: int
    caller: Caller | None = None
    thread_id: str = ""
    request: wire.Request | None = None
    provider: Provider | None = None
    reserved: bool = False
    cap: int = 0
    sent: bool = False  # the request went upstream (the provider may bill it)
    outcome: usage_pb2.ModelCallOutcome.ValueType = OK
    reason: str = ""
    status: int = 200
    usage: wire.Usage | None = None
    streamed: int = 0
    model: str = ""
    response_id: str = ""  # the provider's id of its answer
    first_byte: float = 0.0
    head_sent: bool = False  # the answer's status line went out
    finished: bool = False
    settled: bool = False

    def end(
        self, outcome: usage_pb2.ModelCallOutcome.ValueType, reason: str, status: int,
        only_if_ok: bool = False,
    ) -> None:  # fmt: skip
        if only_if_ok and (self.finished or self.outcome != OK):
            return
        self.outcome, self.reason, self.status = outcome, reason, status

    def read(self, meter: wire.StreamMeter) -> None:
        """What the stream's meter found so far: usage, text streamed, model, answer id."""
        self.usage, self.streamed, self.model = meter.usage, meter.streamed, meter.model
        self.response_id = meter.response_id

    @property
    def label(self) -> str:
        """The model as a metric label: configured models only (bounded cardinality)."""
        return self.request.model if self.request and self.provider else "-"


class HeapTrim:
    """Gives freed memory back to the system once the calls that held it are gone (checked
    every few seconds): after thousands of streams end at once, glibc keeps the pages
    they freed unless asked (`malloc_trim`), and the replica would stay at its peak."""

    def __init__(self) -> None:
        self.due = False
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            self._trim = None

    def idle(self) -> None:
        self.due = True

    async def run(self, gateway: ModelGateway, every_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self.due and not gateway.open_calls and not gateway.settling:
                self.due = False
                gc.collect()
                if self._trim is not None:
                    self._trim(0)


class ModelGateway:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.auth = Authenticator(settings.admin_token, Authenticator.no_keys, 0.0)
        self.upstreams: dict[str, Upstream] = {}
        self.channels: list[grpc.aio.Channel] = []
        self._states: dict[tuple[str, str], tuple[float, int, str]] = {}
        self._fetching: dict[tuple[str, str], asyncio.Future[tuple[int, str]]] = {}
        self._settling: set[asyncio.Task[int | None]] = set()
        self._settle_slots = asyncio.Semaphore(SETTLE_CONCURRENCY)
        self.open_calls = 0
        self.memory = HeapTrim()
        self._trimmer: asyncio.Task[None] | None = None
        # A call's hold outlives its longest run (MODEL_CALL_MAX_DURATION, then cut) by
        # SETTLE_GRACE_S to settle in; unsettled by then, it is charged in full.
        self.hold_s = settings.model_call_max_s + SETTLE_GRACE_S

    async def open(self) -> None:
        """Channels, stubs and upstream clients, on the serving event loop."""
        s = self.settings
        agent, thread, usage = (
            open_channel(s, s.peer_address(p), forwarding=False) for p in registry.SERVICES
        )
        self.channels = [agent, thread, usage]
        self.agents = agent_service_pb2_grpc.AgentServiceStub(agent)
        self.threads = thread_service_pb2_grpc.ThreadServiceStub(thread)
        self.usage = usage_service_pb2_grpc.UsageServiceStub(usage)
        self.auth = Authenticator(
            s.admin_token, AgentClient(agent, s.auth_cache_s).principal, s.auth_cache_s
        )
        self._trimmer = asyncio.create_task(self.memory.run(self))
        self.upstreams = {
            p.name: Upstream(p, s.http_max_connections) for p in self.catalog.providers
            if p.api != "echo"
        }  # fmt: skip

    @property
    def settling(self) -> int:
        return len(self._settling)

    async def close(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self._settling:  # calls being settled finish first (bounded by the grace period)
            await asyncio.wait(self._settling, timeout=self.settings.grace_period_s)
        for upstream in self.upstreams.values():
            await upstream.close()
        for channel in self.channels:
            await channel.close()

    # Identity and state ----------------------------------------------------------------
    async def identify(self, headers: dict[str, str]) -> Caller:
        authorization = headers.get("authorization")
        if not authorization and headers.get("x-api-key"):
            authorization = f"Bearer {headers['x-api-key']}"
        try:
            principal = await self.auth.authenticate(authorization)
        except errors.ServiceError as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                raise Refused(
                    401, "invalid_api_key", f"{exc}: send an agentplane agent key"
                ) from None
            raise Refused(503, "unavailable", str(exc)) from None
        if principal.role != AGENT:
            raise Refused(
                403, "agent_key_required",
                "the model gateway takes an agent's API key: usage is recorded under its agent",
            )  # fmt: skip
        if principal.agent_terminated:
            raise Refused(403, "agent_terminated", f"agent {principal.subject!r} is TERMINATED")
        assert authorization is not None
        metadata: tuple[tuple[str, str], ...] = (("authorization", authorization),)
        if self.settings.admin_token:  # admitted here: the services do not limit it again
            proof = internal_proof(self.settings.admin_token, authorization)
            metadata += ((INTERNAL_HEADER, proof),)
        return Caller(principal, metadata)

    async def who(self, headers: dict[str, str]) -> Caller:
        """The caller, an agent that may spend (neither PAUSED nor TERMINATED)."""
        caller = await self.identify(headers)
        await self.may_spend(caller)
        return caller

    async def may_spend(self, caller: Caller) -> None:
        try:
            await self.check_agent(caller)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc, "") from None

    async def _state(
        self, kind: str, key: str, fetch: Callable[[], Awaitable[tuple[int, str]]]
    ) -> tuple[int, str]:
        now = time.monotonic()
        cached = self._states.get((kind, key))
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        pending = self._fetching.get((kind, key))  # one fetch at a time per item
        if pending is None:
            pending = asyncio.ensure_future(fetch())
            self._fetching[(kind, key)] = pending
            pending.add_done_callback(lambda _: self._fetching.pop((kind, key), None))
        value = await asyncio.shield(pending)
        if len(self._states) > 100_000:
            self._states.clear()
        self._states[(kind, key)] = (now + self.settings.model_state_cache_s, *value)
        return value

    async def check_agent(self, caller: Caller) -> None:
        async def fetch() -> tuple[int, str]:
            agent = await self.agents.GetAgent(
                agent_service_pb2.GetAgentRequest(agent_id=caller.agent),
                metadata=caller.metadata, timeout=self.settings.peer_timeout_s,
            )  # fmt: skip
            return agent.status, agent.project_id

        status, _ = await self._state("agent", caller.agent, fetch)
        if status == agent_pb2.AGENT_STATUS_PAUSED:
            raise Refused(403, "agent_paused", f"agent {caller.agent!r} is PAUSED")
        if status == agent_pb2.AGENT_STATUS_TERMINATED:
            raise Refused(403, "agent_terminated", f"agent {caller.agent!r} is TERMINATED")

    async def check_thread(self, caller: Caller, thread_id: str) -> None:
        async def fetch() -> tuple[int, str]:
            try:
                thread = await self.threads.GetThread(
                    thread_service_pb2.GetThreadRequest(thread_id=thread_id, message_limit=1),
                    metadata=caller.metadata, timeout=self.settings.peer_timeout_s,
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    return 0, ""
                raise
            return thread.thread.status, thread.thread.project_id

        status, project = await self._state("thread", thread_id, fetch)
        if not status or project != caller.project:
            raise Refused(
                404, "thread_not_found",
                f"thread {thread_id!r} is not a thread of project {caller.project!r}",
                THREAD_HEADER,
            )  # fmt: skip
        if status != thread_pb2.THREAD_STATUS_ACTIVE:
            name = thread_pb2.ThreadStatus.Name(status).removeprefix("THREAD_STATUS_")  # type: ignore[arg-type]
            raise Refused(403, "thread_ended", f"thread {thread_id!r} is {name}")

    # Admission ------------------------------------------------------------------------
    async def admit(self, call: Call) -> None:
        """Hold the call's ceiling (accepting less, down to a minimal answer) and set the
        output cap to what the hold allows."""
        request, caller, provider = call.request, call.caller, call.provider
        assert request and caller and provider
        wanted = (
            0
            if request.operation == wire.EMBEDDINGS
            else (request.cap or provider.max_output_tokens)
        )
        least = min(self.settings.min_output_tokens, wanted)
        reserve = usage_service_pb2.ReserveBudgetRequest(
            reservation_id=call.call_id, thread_id=call.thread_id,
            tokens=request.prompt_bound + wanted, min_tokens=request.prompt_bound + least,
            agent_id=caller.agent, model=request.model, project_id=caller.project,
            on_expiry=usage_service_pb2.EXPIRY_ACTION_CHARGE,
            ttl=duration_pb2.Duration(seconds=int(self.hold_s)),
        )  # fmt: skip
        held = await self.usage.ReserveBudget(
            reserve, metadata=caller.metadata, timeout=self.settings.peer_timeout_s
        )
        call.reserved = True
        call.cap = held.tokens - request.prompt_bound

    # The call -------------------------------------------------------------------------
    async def handle(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        operation, api = wire.OPERATIONS[scope["path"]]
        call = Call(str(ULID()), operation, api, time.perf_counter(), time.time_ns() // 1_000_000)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        span = server_span(operation, {k: v for k, v in headers.items() if k in TRACE_HEADERS})
        task = asyncio.current_task()
        assert task is not None
        watcher: list[asyncio.Task[None]] = []
        self.open_calls += 1
        try:
            await self._run(call, headers, receive, send, watcher)
        except Refused as exc:
            call.end(REFUSED, exc.code, exc.status)
            MODEL_REFUSALS.labels(exc.code).inc()
            await _send_error(send, call, exc)
        except asyncio.CancelledError:  # the client left (see _watch)
            call.end(CANCELLED, "client_disconnected", 499, only_if_ok=True)
            task.uncancel()
        except Exception as exc:  # nothing unexpected reaches the caller as a trace
            log.error("model gateway error", exc_info=exc, call_id=call.call_id)
            call.end(UPSTREAM_ERROR, "internal", 500)
            with contextlib.suppress(Exception):
                message = f"internal error (call {call.call_id})"
                await _send_error(send, call, Refused(500, "internal", message))
        finally:
            call.finished = True
            self.open_calls -= 1
            for running in watcher:
                running.cancel()
            self._observe(call, span)
            if not self.open_calls:
                self.memory.idle()
        self._settle_later(call)

    async def _run(
        self, call: Call, headers: dict[str, str], receive: Receive, send: Send,
        watcher: list[asyncio.Task[None]],
    ) -> None:  # fmt: skip
        call.caller = await self.identify(headers)
        await self.may_spend(call.caller)
        raw = await _read_body(receive, headers, self.settings.model_max_body_bytes)
        task = asyncio.current_task()
        assert task is not None
        watcher.append(asyncio.create_task(_watch(receive, call, task)))
        await self._prepare(call, raw, headers)
        await self._admitted(call)
        await self._forward(call, headers, send)

    def _settle_later(self, call: Call) -> None:
        """Settle in the background (a finished response does not wait for it), held
        until done; a call of no known project has nothing to settle."""
        if call.caller is None or not call.caller.project:
            return
        settle = asyncio.create_task(self._settle_queued(call))
        self._settling.add(settle)
        settle.add_done_callback(self._settling.discard)

    async def _admitted(self, call: Call) -> None:
        """Admission, with the services' refusals as the client's."""
        try:
            await self.admit(call)
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc, call.thread_id) from None

    async def _prepare(self, call: Call, raw: bytes, headers: dict[str, str]) -> None:
        try:
            call.request = wire.parse(
                call.operation, call.api, raw, self.settings.model_image_tokens
            )
        except wire.WireError as exc:
            raise Refused(exc.status, exc.code, exc.message, exc.param) from None
        call.provider = self.catalog.route(call.request.model)
        if call.provider is None:
            raise Refused(
                404, "model_not_found",
                f"the model {call.request.model!r} does not exist or is not served here", "model",
            )  # fmt: skip
        call.thread_id = headers.get(THREAD_HEADER, "").strip()
        if call.thread_id:
            assert call.caller is not None
            try:
                await self.check_thread(call.caller, call.thread_id)
            except grpc.aio.AioRpcError as exc:
                raise _refusal(exc, call.thread_id) from None

    async def _forward(self, call: Call, headers: dict[str, str], send: Send) -> None:
        """Forward within MODEL_CALL_MAX_DURATION: a call still running then is cut (its
        hold must not lapse while it runs)."""
        try:
            async with asyncio.timeout(self.settings.model_call_max_s):
                await self._upstream(call, headers, send)
        except TimeoutError:
            call.outcome, call.reason = TIMEOUT, "max_duration"
            if call.head_sent:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                limit = self.settings.model_call_max_s
                message = f"the call ran past MODEL_CALL_MAX_DURATION ({limit:g} s)"
                await _send_error(send, call, Refused(504, "upstream_timeout", message))

    async def _upstream(self, call: Call, headers: dict[str, str], send: Send) -> None:
        request, provider = call.request, call.provider
        assert request and provider
        body = request.upstream_body(call.cap if request.operation != wire.EMBEDDINGS else None)
        if provider.api == "echo":
            call.sent = True
            await self._answer(call, echo.echo_answer(request, call.cap, call.call_id), send, None)
            return
        upstream = self.upstreams[provider.name]
        try:
            call.sent = True
            response = await upstream.open(request.operation, body, headers)
        except UpstreamTimeout as exc:
            call.outcome, call.reason, call.status = TIMEOUT, exc.stage, 504
            call.sent = exc.stage != "connect"
            await _send_error(send, call, Refused(504, "upstream_timeout", str(exc)))
            return
        except UpstreamFailed as exc:
            call.outcome, call.reason, call.status = (
                UPSTREAM_ERROR,
                "upstream_failed",
                502,
            )
            call.sent = exc.sent
            await _send_error(send, call, Refused(502, "upstream_failed", str(exc)))
            return
        try:
            await self._relay(call, upstream, response, send)
        finally:
            await response.aclose()

    async def _relay(
        self, call: Call, upstream: Upstream, response: httpx.Response, send: Send
    ) -> None:
        request = call.request
        assert request
        try:
            if response.status_code >= 300:
                body = await upstream.read_all(response)
                call.outcome, call.reason = (
                    UPSTREAM_ERROR,
                    f"http_{response.status_code}",
                )
                call.status = response.status_code
                call.usage = wire.usage_of(request.operation, _json(body))
                passed = {
                    k: v
                    for k, v in response.headers.items()
                    if k in ("retry-after", "content-type")
                }
                await _send_whole(send, call, response.status_code, body, passed)
            elif request.stream:
                await self._answer(
                    call, upstream.events(response), send, response.headers.get("content-type")
                )
            else:
                await self._answer(call, await upstream.read_all(response), send, None)
        except UpstreamTimeout as exc:  # (a stream's own are handled as it passes)
            call.outcome, call.reason = TIMEOUT, exc.stage
            await _send_error(send, call, Refused(504, "upstream_timeout", str(exc)))
        except UpstreamFailed as exc:
            call.outcome, call.reason = UPSTREAM_ERROR, "upstream_failed"
            await _send_error(send, call, Refused(502, "upstream_failed", str(exc)))

    async def _answer(self, call: Call, answer: Any, send: Send, content_type: str | None) -> None:
        """Send the provider's answer: a whole body (settled first, so that its headers
        can carry the usage id and cost), or a stream, event by event."""
        if isinstance(answer, bytes):
            await self._answer_whole(call, answer, send)
        else:
            await self._answer_stream(call, answer, send, content_type)

    async def _answer_whole(self, call: Call, answer: bytes, send: Send) -> None:
        assert call.request
        data = _json(answer)
        call.usage = wire.usage_of(call.request.operation, data)
        call.model = str(data.get("model") or "") if isinstance(data, dict) else ""
        call.response_id = wire.response_id(data)
        cost = await self._settle(call) if call.usage else None
        extra = {"agentplane-usage-id": call.call_id}
        if cost is not None:
            extra["agentplane-cost-micros"] = str(cost)
        await _send_whole(send, call, 200, answer, {"content-type": "application/json", **extra})

    async def _answer_stream(
        self, call: Call, answer: Any, send: Send, content_type: str | None
    ) -> None:
        assert call.request
        meter = wire.StreamMeter(call.request)
        call.head_sent = True
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [(b"content-type", (content_type or "text/event-stream").encode()),
                        (b"cache-control", b"no-cache"),
                        (b"agentplane-usage-id", call.call_id.encode())],
        })  # fmt: skip
        events = answer if not isinstance(answer, list) else _iterate(answer)
        try:
            async for event in events:
                if meter.keep(event):
                    if meter.done and meter.usage is not None and not call.settled:
                        await self._settle_before_last(call, meter)
                    call.first_byte = call.first_byte or time.perf_counter()
                    await send({"type": "http.response.body", "body": event, "more_body": True})
        except UpstreamTimeout as exc:  # the stream is cut: the client sees it end early
            call.outcome, call.reason = TIMEOUT, exc.stage
        except UpstreamFailed:
            call.outcome, call.reason = UPSTREAM_ERROR, "stream_cut"
        finally:
            call.read(meter)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _settle_before_last(self, call: Call, meter: wire.StreamMeter) -> None:
        """Settle a stream whose usage is known before its last event goes out: the
        client's span, which ends (and may be exported) when it reads that event, then
        finds the call metered (SPEC §16)."""
        call.read(meter)
        await self._settle_queued(call)

    # Settling -------------------------------------------------------------------------
    async def _settle_queued(self, call: Call) -> int | None:
        """Settle when one of SETTLE_CONCURRENCY slots is free: thousands of calls ending
        at once (a fleet dropping its streams) queue here instead of timing out at the
        usage service."""
        async with self._settle_slots:
            return await self._settle(call)

    async def _settle(self, call: Call) -> int | None:
        """Record the call's usage (and log it) exactly once, or log it alone and give
        its hold back. Returns the cost in micro-USD when usage was recorded. Safe to call
        twice: the second call finds it settled."""
        if call.settled or call.caller is None:
            return None
        usage, estimated = self._usage_to_record(call)
        logged = self._log_entry(call)
        caller = call.caller
        try:
            if usage is not None and call.request is not None:
                reply = await _retrying(lambda: self.usage.RecordUsage(
                    usage_service_pb2.RecordUsageRequest(
                        usage_id=call.call_id, thread_id=call.thread_id, agent_id=caller.agent,
                        project_id=caller.project, model=call.request.model,  # type: ignore[union-attr]
                        prompt_tokens=usage.prompt, completion_tokens=usage.completion,
                        cached_prompt_tokens=usage.cached, cache_write_tokens=usage.cache_write,
                        reasoning_tokens=usage.reasoning, estimated=estimated,
                        latency_ms=int((time.perf_counter() - call.started) * 1000),
                        reservation_id=call.call_id if call.reserved else "", call=logged,
                    ),
                    metadata=caller.metadata, timeout=self.settings.peer_timeout_s,
                ), until=call.started + self.hold_s - 1)  # fmt: skip
                call.settled = True
                self._count(call, usage, reply.cost_micros)
                return int(reply.cost_micros)
            if call.reserved:
                await _retrying(lambda: self.usage.ReleaseReservation(
                    usage_service_pb2.ReleaseReservationRequest(
                        thread_id=call.thread_id, reservation_id=call.call_id,
                        project_id=caller.project,
                    ), metadata=caller.metadata, timeout=self.settings.peer_timeout_s,
                ))  # fmt: skip
            await _retrying(lambda: self.usage.LogModelCall(
                usage_service_pb2.LogModelCallRequest(call=logged),
                metadata=caller.metadata, timeout=self.settings.peer_timeout_s,
            ))  # fmt: skip
            call.settled = True
        except grpc.aio.AioRpcError as exc:  # the hold is charged in full when it expires
            log.error("cannot settle a model call", call_id=call.call_id, code=exc.code().name)
        return None

    def _usage_to_record(self, call: Call) -> tuple[wire.Usage | None, bool]:
        """The provider's usage; else, for a call that reached the provider and was not
        answered with an error (a cut stream, a timeout, a client that left), an estimate
        flagged as such: the prompt bound plus the text streamed, within the cap. A
        refusal and an upstream error that reported no usage record none."""
        if call.usage is not None:
            return call.usage, False
        if call.request is None or not call.sent or call.outcome == REFUSED:
            return None, False
        if call.outcome == UPSTREAM_ERROR and call.status >= 300:
            return None, False
        completion = min(call.streamed, call.cap) if call.cap else call.streamed
        return wire.Usage(prompt=call.request.prompt_bound, completion=completion), True

    def _log_entry(self, call: Call) -> usage_pb2.ModelCall:
        caller = call.caller
        assert caller is not None
        now = time.perf_counter()
        entry = usage_pb2.ModelCall(
            call_id=call.call_id, project_id=caller.project, agent_id=caller.agent,
            thread_id=call.thread_id, api_key_id=caller.principal.key_id,
            model_requested=call.request.model if call.request else "",
            model=call.model, provider=call.provider.name if call.provider else "",
            outcome=call.outcome, reason=call.reason[:1024], http_status=call.status,
            start_time=timestamp(call.start_ms), operation=call.operation,
            stream=bool(call.request and call.request.stream), response_id=call.response_id,
        )  # fmt: skip
        entry.duration.FromNanoseconds(int((now - call.started) * 1e9))
        if call.first_byte:
            entry.time_to_first_token.FromNanoseconds(int((call.first_byte - call.started) * 1e9))
        return entry

    def _count(self, call: Call, usage: wire.Usage, cost: int) -> None:
        label = call.label
        for kind, value in (("prompt", usage.prompt), ("completion", usage.completion),
                            ("cached", usage.cached), ("cache_write", usage.cache_write),
                            ("reasoning", usage.reasoning)):  # fmt: skip
            if value:
                MODEL_TOKENS.labels(label, kind).inc(value)
        if cost:
            MODEL_COST.labels(label).inc(cost)

    def _observe(self, call: Call, span: Any) -> None:
        duration = time.perf_counter() - call.started
        label = call.label
        outcome = usage_pb2.ModelCallOutcome.Name(call.outcome).removeprefix("MODEL_CALL_OUTCOME_")
        MODEL_CALLS.labels(label, outcome).inc()
        MODEL_DURATION.labels(label).observe(duration)
        if call.first_byte:
            MODEL_TTFT.labels(label).observe(call.first_byte - call.started)
        attributes: dict[str, str | int | bool] = {
            "gen_ai.operation.name": "embeddings" if call.operation == wire.EMBEDDINGS else "chat",
            "gen_ai.provider.name": call.provider.api if call.provider else "",
            "gen_ai.request.model": call.request.model if call.request else "",
            "agentplane.call_id": call.call_id, "agentplane.outcome": outcome,
            "http.response.status_code": call.status,
        }  # fmt: skip
        if call.model:
            attributes["gen_ai.response.model"] = call.model
        if call.usage:
            attributes["gen_ai.usage.input_tokens"] = call.usage.prompt
            attributes["gen_ai.usage.output_tokens"] = call.usage.completion
        if call.thread_id:
            attributes["agentplane.thread_id"] = call.thread_id
        span.set(attributes)
        if call.status >= 500:
            span.fail(call.reason)
        span.end()
        access_log.write(
            "http", call.status < 400, duration, method="POST", route=f"/v1 {call.operation}",
            status=call.status, call_id=call.call_id,
        )  # fmt: skip


# Helpers ----------------------------------------------------------------------------
# A service's refusal as the client's: (HTTP status, code, the field at fault).
REFUSALS = {
    grpc.StatusCode.FAILED_PRECONDITION: (403, "thread_ended", None),
    grpc.StatusCode.NOT_FOUND: (404, "thread_not_found", THREAD_HEADER),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_api_key", None),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied", None),
}


def _refusal(exc: grpc.aio.AioRpcError, thread_id: str) -> Refused:
    """A service's error as the client's refusal: for budgets, 429 naming them
    (rate_limited when waiting helps, with Retry-After; else budget_exceeded)."""
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        budgets, retry = [], None
        for detail in details_of(exc):
            if isinstance(detail, error_details_pb2.QuotaFailure):
                budgets += [v.subject for v in detail.violations]
            elif isinstance(detail, error_details_pb2.RetryInfo):
                retry = detail.retry_delay.ToNanoseconds() / 1e9
        kind = "rate_limited" if retry is not None else "budget_exceeded"
        return Refused(429, kind, f"{exc.details()} (refused by {', '.join(budgets)})", None, retry)
    if code in REFUSALS:
        status, reason, param = REFUSALS[code]
        where = f"thread {thread_id!r}: " if thread_id else ""
        return Refused(status, reason, f"{where}{exc.details() or reason}", param)
    return Refused(503, "unavailable", "budgets cannot be checked now; nothing was sent upstream")


async def _retrying(make: Callable[[], Awaitable[Any]], until: float = math.inf) -> Any:
    """A settling RPC, tried again while the service is unreachable (each is idempotent),
    but not past `until` (perf_counter): the hold has lapsed then and is charged in full."""
    delay = 0.05
    for attempt in range(SETTLE_ATTEMPTS):
        try:
            return await make()
        except grpc.aio.AioRpcError as exc:
            transient = exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            late = time.perf_counter() + delay > until
            if not transient or attempt + 1 == SETTLE_ATTEMPTS or late:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 3, 2.0)
    raise AssertionError("unreachable")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


async def _iterate(events: list[bytes]) -> Any:
    for event in events:
        yield event


async def _read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(413, "request_too_large", f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(
                413, "request_too_large", f"the request body is larger than {limit} bytes"
            )
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _watch(receive: Receive, call: Call, task: asyncio.Task[Any]) -> None:
    """A client that goes away cancels its call at once (and with it the upstream request)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not call.finished:
                task.cancel()
            return


async def _send_whole(
    send: Send, call: Call, status: int, body: bytes, headers: dict[str, str]
) -> None:
    call.status, call.head_sent = status, True
    call.first_byte = call.first_byte or time.perf_counter()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, call: Call, refused: Refused) -> None:
    headers = {"content-type": "application/json"}
    if refused.retry_after is not None:
        headers["retry-after"] = str(max(1, int(refused.retry_after + 0.999)))
    body = wire.error_body(call.api, refused.status, refused.code, refused.message, refused.param)
    await _send_whole(send, call, refused.status, body, headers)
    call.first_byte = 0.0  # an error is not a first token


class ModelsApp:
    """The ASGI application: the four model operations, `GET /v1/models`, and health."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.gateway = ModelGateway(settings, catalog)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in wire.OPERATIONS and method == "POST":
            await self.gateway.handle(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            await self._models(scope, send)
        elif path in ("/healthz", "/readyz") and method in ("GET", "HEAD"):
            await _send_plain(send, 200, b"ok\n")
        else:
            await self._no_route(scope, send)

    async def _no_route(self, scope: dict[str, Any], send: Send) -> None:
        path, method = scope["path"], scope["method"]
        api = wire.ANTHROPIC if _headers(scope).get("anthropic-version") else wire.OPENAI
        status = 405 if path in wire.OPERATIONS or path == "/v1/models" else 404
        code = "not_found" if status == 404 else "method_not_allowed"
        body = wire.error_body(api, status, code, f"no route {method} {path}")
        await _send_plain(send, status, body, b"application/json")

    async def _models(self, scope: dict[str, Any], send: Send) -> None:
        """The models this key may call, in the format of the SDK that asks (Anthropic's
        when an `anthropic-version` header is sent, else OpenAI's)."""
        headers = _headers(scope)
        api = wire.ANTHROPIC if headers.get("anthropic-version") else wire.OPENAI
        try:
            await self.gateway.who(headers)
        except Refused as exc:
            body = wire.error_body(api, exc.status, exc.code, exc.message)
            await _send_plain(send, exc.status, body, b"application/json")
            return
        listed = self.gateway.catalog.listed()
        if api == wire.ANTHROPIC:
            epoch = "1970-01-01T00:00:00Z"
            data = [{"type": "model", "id": m, "display_name": m, "created_at": epoch}
                    for m, _ in listed]  # fmt: skip
            body = orjson.dumps({"data": data, "has_more": False,
                                 "first_id": data[0]["id"] if data else None,
                                 "last_id": data[-1]["id"] if data else None})  # fmt: skip
        else:
            body = orjson.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": p.name} for m, p in listed
            ]})  # fmt: skip
        await _send_plain(send, 200, body, b"application/json")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await lifespan(receive, send, self.gateway.open, self.gateway.close)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _send_plain(send: Send, status: int, body: bytes, kind: bytes = b"text/plain") -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
