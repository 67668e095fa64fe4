"""The async client: channels, credentials, retries, idempotency keys, the budget guard and
batched usage recording."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.channel_options import CHANNEL_OPTIONS
from agentplane.thread.v1 import thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc

log = logging.getLogger("agentplane.client")
Reply = TypeVar("Reply")

# Worth another attempt: the service was unreachable, or did not answer in time. Every
# write the client sends carries its idempotency key, so a repeat never counts twice.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def new_key() -> str:
    """An idempotency key (request_id, usage_id, reservation_id)."""
    return uuid.uuid4().hex


IDEMPOTENCY_FIELDS = ("request_id", "usage_id", "reservation_id")


def with_key(request: Any) -> Any:
    """Give a request its idempotency key if it takes one and has none (in place)."""
    fields = request.DESCRIPTOR.fields_by_name
    for name in IDEMPOTENCY_FIELDS:
        if name in fields and not getattr(request, name):
            setattr(request, name, new_key())
    return request


@dataclass(frozen=True)
class Retry:
    """How calls are retried: `attempts` in all, waits doubling from `base_s` up to
    `max_s`, each with jitter (half to all of it), each attempt bounded by `timeout_s`."""

    attempts: int = 6
    base_s: float = 0.1
    max_s: float = 2.0
    timeout_s: float = 10.0

    def wait_s(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)


class BudgetExhausted(Exception):
    """A reservation was refused: `subjects` names every refusing budget ("thread:<id>",
    "budget:<id>")."""

    def __init__(self, message: str, subjects: list[str]) -> None:
        super().__init__(message)
        self.subjects = subjects


def _quota_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    subjects: list[str] = []
    for detail in status.details if status else ():
        failure = error_details_pb2.QuotaFailure()
        if detail.Unpack(failure):
            subjects += [v.subject for v in failure.violations]
    return subjects


DEFAULT_ADDRESSES = {"agent": "localhost:50051", "thread": "localhost:50052",
                     "usage": "localhost:50053"}  # fmt: skip


def service_address(name: str, env: Mapping[str, str] | None = None) -> str:
    """Where service `name` (agent, thread, usage) is: AGENTPLANE_<NAME>_ADDR, else the
    services' own <NAME>_SVC_ADDR (what a pod in the cluster already has), else the
    local default (localhost:50051/2/3)."""
    env = os.environ if env is None else env
    upper = name.upper()
    return (
        env.get(f"AGENTPLANE_{upper}_ADDR")
        or env.get(f"{upper}_SVC_ADDR")
        or DEFAULT_ADDRESSES[name]
    )


class AgentplaneClient:
    """One object for the three services. Each address defaults to AGENTPLANE_<S>_ADDR,
    then the services' own <S>_SVC_ADDR (AGENT_SVC_ADDR, THREAD_SVC_ADDR, USAGE_SVC_ADDR),
    else localhost:50051/2/3; the token to AGENTPLANE_TOKEN. `credentials`: grpc channel
    credentials for TLS or mutual TLS (`grpc.ssl_channel_credentials(ca, key, cert)`);
    plaintext without."""

    def __init__(
        self,
        *,
        token: str | None = None,
        agent_addr: str | None = None,
        thread_addr: str | None = None,
        usage_addr: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: Retry | None = None,
        batch_size: int = 500,
        batch_delay_s: float = 0.05,
    ) -> None:
        env = os.environ
        # A token pasted with its newline (`export T=$(cat file)` keeps none, an editor may).
        self._token = (token if token is not None else env.get("AGENTPLANE_TOKEN", "")).strip()
        self.retry = retry or Retry()
        self.addresses = [
            given or service_address(name, env)
            for name, given in (("agent", agent_addr), ("thread", thread_addr),
                                ("usage", usage_addr))
        ]  # fmt: skip
        self._credentials = credentials
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: tuple[Any, Any, Any] | None = None
        self.budget = BudgetApi(self)
        self.usage = UsageRecorder(self, batch_size, batch_delay_s)

    def _connected(self) -> tuple[Any, Any, Any]:
        """The stubs; channels open on first use, inside the event loop that uses them
        (so a client may be made before the loop starts)."""
        if self._stubs is None:
            self._channels = [
                grpc.aio.secure_channel(a, self._credentials, options=CHANNEL_OPTIONS)
                if self._credentials is not None
                else grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)
                for a in self.addresses
            ]
            self._stubs = (
                agent_service_pb2_grpc.AgentServiceStub(self._channels[0]),
                thread_service_pb2_grpc.ThreadServiceStub(self._channels[1]),
                usage_service_pb2_grpc.UsageServiceStub(self._channels[2]),
            )
        return self._stubs

    @property
    def agents(self) -> agent_service_pb2_grpc.AgentServiceStub:
        return self._connected()[0]

    @property
    def threads(self) -> thread_service_pb2_grpc.ThreadServiceStub:
        return self._connected()[1]

    @property
    def usage_service(self) -> usage_service_pb2_grpc.UsageServiceStub:
        return self._connected()[2]

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    async def call(self, method: Callable[..., Awaitable[Reply]], request: Any) -> Reply:
        """One unary call with the token, a deadline per attempt, and retries on
        UNAVAILABLE / DEADLINE_EXCEEDED. A write that takes an idempotency key
        (`request_id`, `usage_id`, `reservation_id`) gets one here if it has none, and the
        same request — the same key — is sent on every attempt."""
        with_key(request)
        for attempt in range(self.retry.attempts):
            try:
                return await method(request, metadata=self.metadata, timeout=self.retry.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt == self.retry.attempts - 1:
                    raise
                wait = self.retry.wait_s(attempt)
                log.info("retrying %s in %.2fs after %s", method, wait, exc.code().name)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Send what is buffered, then close the channels."""
        await self.usage.close()
        for channel in self._channels:
            await channel.close()
        self._channels, self._stubs = [], None

    async def __aenter__(self) -> AgentplaneClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        await self.close()


class BudgetApi:
    def __init__(self, client: AgentplaneClient) -> None:
        self._client = client

    def guard(
        self, thread_id: str, *, tokens: int, model: str = "", agent_id: str = "",
        ttl_s: float = 0.0,
    ) -> BudgetGuard:  # fmt: skip
        """Reserve `tokens` of the thread's budget (and of every HARD budget covering the
        agent and model) for one LLM call; see `BudgetGuard`."""
        return BudgetGuard(self._client, thread_id, tokens, model, agent_id, ttl_s)


@dataclass
class BudgetGuard:
    """`async with` it around an LLM call: it reserves on entry (raising BudgetExhausted if
    refused), and on exit settles with what `record()` was given — or, on an exception or
    without a record, releases the reservation."""

    client: AgentplaneClient
    thread_id: str
    tokens: int
    model: str
    agent_id: str
    ttl_s: float
    reservation_id: str = field(default_factory=new_key)
    usage_id: str = field(default_factory=new_key)
    recorded: U.RecordUsageRequest | None = None
    result: U.RecordUsageResponse | None = None

    def record(
        self, *, prompt_tokens: int, completion_tokens: int, latency_ms: int = 0,
        cached_prompt_tokens: int = 0, reasoning_tokens: int = 0,
    ) -> None:  # fmt: skip
        """What the call used; sent when the block ends (once, whatever the retries)."""
        self.recorded = U.RecordUsageRequest(
            usage_id=self.usage_id, thread_id=self.thread_id, agent_id=self.agent_id,
            model=self.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            latency_ms=latency_ms, reservation_id=self.reservation_id,
            cached_prompt_tokens=cached_prompt_tokens, reasoning_tokens=reasoning_tokens,
        )  # fmt: skip

    async def __aenter__(self) -> BudgetGuard:
        request = U.ReserveBudgetRequest(
            reservation_id=self.reservation_id, thread_id=self.thread_id, tokens=self.tokens,
            agent_id=self.agent_id, model=self.model,
        )  # fmt: skip
        if self.ttl_s:
            request.ttl.FromMilliseconds(int(self.ttl_s * 1000))
        try:
            await self.client.call(self.client.usage_service.ReserveBudget, request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise BudgetExhausted(
                    exc.details() or "budget exhausted", _quota_subjects(exc)
                ) from None
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        if error is None and self.recorded is not None:
            self.result = await self.client.call(
                self.client.usage_service.RecordUsage, self.recorded
            )
            return
        await self.client.call(
            self.client.usage_service.ReleaseReservation,
            U.ReleaseReservationRequest(
                thread_id=self.thread_id, reservation_id=self.reservation_id
            ),
        )


class UsageRecorder:
    """`record()` buffers usage records and sends them as RecordUsageBatch: when
    `batch_size` are waiting, after `batch_delay_s`, and on `flush()`/`close()`. Each
    record gets its usage_id when it is buffered, so a batch retried after a failure never
    counts twice. Records the service refuses (bad input) are kept in `refused`."""

    def __init__(self, client: AgentplaneClient, batch_size: int, delay_s: float) -> None:
        self._client = client
        self._size = batch_size
        self._delay_s = delay_s
        self._buffer: list[U.RecordUsageRequest] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.refused: list[tuple[U.RecordUsageRequest, str]] = []
        self.sent = 0

    def record(self, **fields: Any) -> str:
        """Buffer one record (the fields of RecordUsageRequest); returns its usage_id."""
        request = U.RecordUsageRequest(**fields)
        if not request.usage_id:
            request.usage_id = new_key()
        self._buffer.append(request)
        if len(self._buffer) >= self._size:
            self._send_now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._send_now)
        return request.usage_id

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._buffer = self._buffer, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[U.RecordUsageRequest]) -> None:
        try:
            reply = await self._client.call(
                self._client.usage_service.RecordUsageBatch,
                U.RecordUsageBatchRequest(requests=batch),
            )
        except BaseException:
            self._buffer[:0] = batch  # kept, same ids, for the next flush
            raise
        for request, result in zip(batch, reply.results, strict=True):
            if result.status.code != grpc.StatusCode.OK.value[0]:
                self.refused.append((request, result.status.message))
            else:
                self.sent += 1

    async def flush(self) -> None:
        """Send everything buffered and wait for every batch in flight."""
        self._send_now()
        while self._sending:
            await asyncio.gather(*list(self._sending))

    async def close(self) -> None:
        await self.flush()
