"""ThreadService: checks requests (agents through the agent service, budgets through the
usage service), calls the store, maps records to messages."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format, struct_pb2
from grpc.aio import ServicerContext

from agentplane.agent.v1 import agent_pb2
from agentplane.thread.v1 import thread_pb2, thread_service_pb2, thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2
from services.common import enums, errors, tuning
from services.common.access import require_manager, require_self, require_superuser
from services.common.clients import PeerClients
from services.common.convert import new_id, require_client_id, require_id, require_text, timestamp
from services.common.interceptors import stream_open
from services.common.limits import MAX_BUDGET_TOKENS as MAX_BUDGET
from services.common.limits import (
    MAX_ID_LENGTH,
    MAX_PARTICIPANTS,
    MAX_PAYLOAD_TYPE_LENGTH,
    MAX_REASON_LENGTH,
    MAX_TITLE_LENGTH,
)
from services.common.logging import get_logger
from services.common.pagination import parse_page
from services.common.peers import AgentClient
from services.common.settings import Settings
from services.thread_svc.store import (
    ALL,
    Delivery,
    NewMessage,
    NewThread,
    Outcome,
    RequestKey,
    StoredMessage,
    ThreadRecord,
    ThreadStorage,
)

log = get_logger("agentplane.thread")

OPERATOR = "operator"

TERMINAL = {"COMPLETED", "FAILED", "KILLED"}
PAUSED = agent_pb2.AGENT_STATUS_PAUSED
TERMINATED = agent_pb2.AGENT_STATUS_TERMINATED


def thread_status_name(value: int) -> str:
    if value not in thread_pb2.ThreadStatus.values():
        raise errors.invalid_argument("status", f"{value} is not a thread status")
    return enums.short_name(thread_pb2.ThreadStatus, value)


def thread_message(record: ThreadRecord, max_tokens: int) -> thread_pb2.Thread:
    """A thread as the API shows it; `max_tokens` comes from its budget (the usage service
    is the one source of truth for it)."""
    thread = thread_pb2.Thread(
        id=record.id,
        project_id=record.project_id,
        title=record.title,
        status=enums.value_of(thread_pb2.ThreadStatus, record.status),
        participants=record.participants,
        message_count=record.message_count - record.dropped,
        max_tokens=max_tokens,
        create_time=timestamp(record.create_ms),
        update_time=timestamp(record.update_ms),
        end_time=timestamp(record.end_ms),
        end_reason=record.end_reason,
    )
    if record.metadata_json:
        json_format.Parse(record.metadata_json, thread.metadata)
    return thread


def message_of(stored: StoredMessage) -> thread_pb2.Message:
    message = thread_pb2.Message(
        id=stored.id,
        thread_id=stored.thread_id,
        from_agent=stored.from_agent,
        to_agent=stored.to_agent,
        payload_type=stored.payload_type,
        create_time=timestamp(stored.ms),
    )
    if stored.payload_json:
        json_format.Parse(stored.payload_json, message.payload)
    return message


class _Inbox:
    """What one inbox stream delivers next: first what this consumer was sent before but
    never acknowledged, then new messages (a blocking read), and — when nothing came for
    a while — deliveries other consumers left unacknowledged too long (they vanished)."""

    def __init__(
        self, store: ThreadStorage, project_id: str, agent_id: str, consumer: str,
        claim_idle_s: float,
    ) -> None:  # fmt: skip
        self._store, self._agent_id, self._consumer = store, agent_id, consumer
        self._project_id = project_id
        self._claim_idle_ms = int(claim_idle_s * 1000)
        self._claim_every_s = min(claim_idle_s, 5.0)
        self._first, self._last_claim = True, time.monotonic()

    async def next(self) -> list[Delivery]:
        pending, self._first = self._first, False
        block_ms = 0 if pending else tuning.STREAM_BLOCK_MS
        found = await self._store.deliveries(
            self._project_id, self._agent_id, self._consumer, pending, block_ms
        )
        if not found and time.monotonic() - self._last_claim > self._claim_every_s:
            found = await self._store.claim_idle(
                self._project_id, self._agent_id, self._consumer, self._claim_idle_ms
            )
            self._last_claim = time.monotonic()
        return found


class ThreadServicer(thread_service_pb2_grpc.ThreadServiceServicer):
    def __init__(
        self, store: ThreadStorage, peers: PeerClients, agents: AgentClient, settings: Settings,
        stopping: asyncio.Event,
    ) -> None:  # fmt: skip
        self._store = store
        self._peers = peers
        self._settings = settings
        self._stopping = stopping
        self._agents = agents

    # Threads ------------------------------------------------------------------------

    async def CreateThread(
        self, request: thread_service_pb2.CreateThreadRequest, context: ServicerContext
    ) -> thread_pb2.Thread:
        require_manager()
        spec = request.thread
        project_id = require_id("thread.project_id", spec.project_id)
        thread_id = require_client_id("thread_id", request.thread_id, new_id())
        title = require_text("thread.title", spec.title, MAX_TITLE_LENGTH)
        if len(spec.participants) > MAX_PARTICIPANTS:
            raise errors.invalid_argument(
                "thread.participants", f"has more than {MAX_PARTICIPANTS}"
            )
        participants = sorted({require_id("thread.participants", p) for p in spec.participants})
        metadata = self._json("thread.metadata", spec.metadata) if spec.HasField("metadata") else ""
        if not 0 <= spec.max_tokens <= MAX_BUDGET:
            raise errors.invalid_argument(
                "thread.max_tokens", f"must be between 0 and {MAX_BUDGET}"
            )
        max_tokens = spec.max_tokens or self._settings.default_max_tokens
        await self._agents.require_project(project_id)
        # Participants are agents of the thread's project (so an agent's threads are all in
        # its own project, which the indexes rely on).
        members = await asyncio.gather(*(self._agents.find_agent(p) for p in participants))
        for participant, agent in zip(participants, members, strict=True):
            if agent is None or agent.project_id != project_id:
                raise errors.invalid_argument(
                    "thread.participants",
                    f"{participant!r} is not an agent of project {project_id!r}",
                )
        if await self._store.get_thread(thread_id) is not None:
            raise errors.already_exists("thread", thread_id)
        return await self._create(thread_id, project_id, title, participants, metadata, max_tokens)

    async def _create(
        self, thread_id: str, project_id: str, title: str, participants: list[str],
        metadata: str, max_tokens: int,
    ) -> thread_pb2.Thread:  # fmt: skip
        # The budget first: a thread never exists without one (a failed create leaves at
        # most an unused budget, which a retry with the same thread_id reuses).
        try:
            budget = await self._peers.usage.SetThreadBudget(
                usage_service_pb2.SetThreadBudgetRequest(
                    thread_id=thread_id, max_tokens=max_tokens, project_id=project_id
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # A budget of that id exists in another project (left by a create that
                # failed half-way): the id is taken.
                raise errors.already_exists("thread", thread_id) from None
            raise
        new = NewThread(thread_id, project_id, title, metadata, tuple(participants))
        if not await self._store.create_thread(new):
            raise errors.already_exists("thread", thread_id)
        return thread_message(await self._thread(thread_id), budget.max_tokens)

    async def GetThread(
        self, request: thread_service_pb2.GetThreadRequest, context: ServicerContext
    ) -> thread_service_pb2.GetThreadResponse:
        if request.message_limit < 0:
            raise errors.invalid_argument("message_limit", "must not be negative")
        record = await self._thread(request.thread_id)
        latest = await self._store.latest_messages(record.id, min(request.message_limit or 20, 100))
        return thread_service_pb2.GetThreadResponse(
            thread=await self._render(record), messages=[message_of(m) for m in latest]
        )

    async def ListThreads(
        self, request: thread_service_pb2.ListThreadsRequest, context: ServicerContext
    ) -> thread_service_pb2.ListThreadsResponse:
        project_id = request.project_id or ALL
        if project_id != ALL:
            require_id("project_id", project_id)
        agent_id = require_id("agent", request.agent) if request.agent else ""
        status = thread_status_name(request.status) if request.status else ""
        if agent_id:
            agent = await self._agents.agent(agent_id)
            if project_id not in (ALL, agent.project_id):
                # An agent's threads are all in its own project: another project has none.
                return thread_service_pb2.ListThreadsResponse()
            project_id = agent.project_id
        elif project_id == ALL:
            require_superuser("listing threads of every project")
        elif not await self._agents.can_see_project(project_id):
            raise errors.not_found("project", project_id)
        page = parse_page(
            request.page_size, request.page_token, request.skip,
            ("threads", project_id, agent_id, status), default_size=50,
        )  # fmt: skip
        found, token, total = await self._store.list_threads(project_id, agent_id, status, page)
        budgets = await self._budgets([r.id for r in found])
        return thread_service_pb2.ListThreadsResponse(
            threads=[thread_message(r, budgets[r.id]) for r in found],
            next_page_token=token,
            total_size=total,
        )

    async def KillThread(
        self, request: thread_service_pb2.KillThreadRequest, context: ServicerContext
    ) -> thread_pb2.Thread:
        reason = require_text("reason", request.reason, MAX_REASON_LENGTH)
        return await self._end(request.thread_id, "KILLED", reason)

    async def CompleteThread(
        self, request: thread_service_pb2.CompleteThreadRequest, context: ServicerContext
    ) -> thread_pb2.Thread:
        return await self._end(request.thread_id, "FAILED" if request.failed else "COMPLETED", "")

    async def _end(self, thread_id: str, target: str, reason: str) -> thread_pb2.Thread:
        require_manager()
        await self._thread(thread_id)
        ended = await self._store.end_thread(thread_id, target, reason)
        if ended.outcome == Outcome.NO_THREAD:
            raise errors.not_found("thread", thread_id)
        if ended.outcome == Outcome.NOT_ACTIVE:
            raise errors.failed_precondition(
                f"thread {thread_id!r} already ended as {ended.status}", "THREAD_ENDED",
                status=ended.status,
            )  # fmt: skip
        # OK or SAME (a retry): either way the budget must end up closed.
        try:
            await self._peers.usage.CloseThreadBudget(
                usage_service_pb2.CloseThreadBudgetRequest(thread_id=thread_id)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        return await self._render(await self._thread(thread_id))

    # Messages -----------------------------------------------------------------------

    async def ListMessages(
        self, request: thread_service_pb2.ListMessagesRequest, context: ServicerContext
    ) -> thread_service_pb2.ListMessagesResponse:
        thread_id = request.thread_id or ALL
        agent_id = require_id("agent", request.agent) if request.agent else ""
        page = parse_page(
            request.page_size, request.page_token, request.skip, ("messages", thread_id, agent_id)
        )
        if thread_id == ALL and not agent_id:
            raise errors.invalid_argument("agent", "is required when listing across threads ('-')")
        dropped = 0
        if agent_id:
            # Filtered listings read an index of the agent's messages (across threads, or in
            # this thread), so pages are full and total_size counts what the filter keeps.
            if thread_id == ALL:
                agent = await self._agents.agent(agent_id)
                found, token, total = await self._store.agent_messages(
                    agent.project_id, agent_id, page
                )
            else:
                dropped = (await self._thread(thread_id)).dropped
                found, token, total = await self._store.thread_agent_messages(
                    thread_id, agent_id, page
                )
        else:
            record = await self._thread(thread_id)
            found, token = await self._store.thread_messages(thread_id, page)
            total, dropped = record.message_count - record.dropped, record.dropped
        return thread_service_pb2.ListMessagesResponse(
            messages=[message_of(m) for m in found],
            next_page_token=token,
            total_size=total,
            dropped_count=dropped,
        )

    async def PostMessage(
        self, request: thread_service_pb2.PostMessageRequest, context: ServicerContext
    ) -> thread_pb2.Message:
        thread_id = require_id("thread_id", request.thread_id)
        sender = require_id("from_agent", request.from_agent)
        require_self(sender, "from_agent")
        recipient = require_id("to_agent", request.to_agent)
        message = self._new_message(
            thread_id, sender, recipient, request.payload_type, request.payload, True
        )
        request_id = require_client_id("request_id", request.request_id, "")
        request_key = RequestKey(f"post:{thread_id}", request_id, thread_id) if request_id else None
        if request_key and (earlier := await self._store.earlier_message(request_key)):
            return message_of(earlier)
        if recipient == OPERATOR:  # an answer to the operator: in the thread, in no inbox
            message = dataclasses.replace(message, recipient_is_agent=False)
        record, sender_agent, recipient_agent = await asyncio.gather(
            self._thread(thread_id),
            self._agents.agent(sender),
            self._agents.agent(sender if recipient == OPERATOR else recipient),
        )
        if sender_agent.status in (PAUSED, TERMINATED):
            status = enums.short_name(agent_pb2.AgentStatus, sender_agent.status)
            raise errors.failed_precondition(
                f"sender {sender!r} is {status} and cannot post", "SENDER_NOT_ACTIVE", status=status
            )
        if recipient_agent.status == TERMINATED:
            raise errors.failed_precondition(
                f"recipient {recipient!r} is TERMINATED", "RECIPIENT_TERMINATED", agent=recipient
            )
        if recipient != OPERATOR and recipient not in sender_agent.peers:
            raise errors.permission_denied(
                f"{recipient!r} is not one of {sender!r}'s peers", "NOT_A_PEER"
            )
        for agent in (sender_agent, recipient_agent):
            if agent.project_id != record.project_id:
                raise errors.failed_precondition(
                    f"agent {agent.id!r} is not in the thread's project", "AGENT_NOT_IN_PROJECT"
                )
        return await self._post(message, request_key)

    async def InjectMessage(
        self, request: thread_service_pb2.InjectMessageRequest, context: ServicerContext
    ) -> thread_service_pb2.InjectMessageResponse:
        require_manager()
        target = require_id("to", request.to)
        request_id = require_client_id("request_id", request.request_id, "")
        thread_id = require_id("thread_id", request.thread_id) if request.thread_id else ""
        agent = await self._agents.find_agent(target)
        if agent is None:
            raise errors.invalid_argument("to", f"no agent {target!r}", "UNKNOWN_AGENT")
        # The request id is kept in the target's project (where the message goes).
        request_key = (
            RequestKey("inject", request_id, project_id=agent.project_id) if request_id else None
        )
        if request_key and (earlier := await self._store.earlier_message(request_key)):
            return thread_service_pb2.InjectMessageResponse(
                thread_id=earlier.thread_id, message_id=earlier.id
            )
        # Checked before any write: the payload, then the target.
        message = self._new_message(
            thread_id or "-", OPERATOR, target, request.payload_type, request.payload, False
        )
        if agent.status == TERMINATED:
            raise errors.failed_precondition(
                f"recipient {target!r} is TERMINATED", "RECIPIENT_TERMINATED", agent=target
            )
        if thread_id:
            record = await self._thread(thread_id)
            if record.project_id != agent.project_id:
                raise errors.failed_precondition(
                    f"agent {target!r} is not in the thread's project", "AGENT_NOT_IN_PROJECT"
                )
        else:
            thread = await self._create(
                new_id(), agent.project_id, f"operator → {agent.name}", [target], "",
                self._settings.default_max_tokens,
            )  # fmt: skip
            thread_id = thread.id
        posted = await self._post(dataclasses.replace(message, thread_id=thread_id), request_key)
        return thread_service_pb2.InjectMessageResponse(
            thread_id=posted.thread_id, message_id=posted.id
        )

    def _new_message(
        self, thread_id: str, sender: str, recipient: str, payload_type: str,
        payload: struct_pb2.Struct, sender_is_agent: bool,
    ) -> NewMessage:  # fmt: skip
        kind = require_text("payload_type", payload_type, MAX_PAYLOAD_TYPE_LENGTH) or "text"
        return NewMessage(
            message_id=new_id(), thread_id=thread_id, from_agent=sender, to_agent=recipient,
            payload_type=kind, payload_json=self._json("payload", payload),
            sender_is_agent=sender_is_agent,
        )  # fmt: skip

    async def _post(
        self, message: NewMessage, request_key: RequestKey | None
    ) -> thread_pb2.Message:
        posted = await self._store.post(message, request_key)
        if posted.outcome == Outcome.NO_THREAD:
            raise errors.not_found("thread", message.thread_id)
        if posted.outcome == Outcome.NOT_ACTIVE:
            raise errors.failed_precondition(
                f"thread {message.thread_id!r} is {posted.status}, not ACTIVE",
                "THREAD_NOT_ACTIVE",
                status=posted.status,
            )
        if posted.message is None:
            raise errors.not_found("message", message.message_id)
        return message_of(posted.message)

    # Streams ------------------------------------------------------------------------

    async def ReceiveMessages(
        self, request: thread_service_pb2.ReceiveMessagesRequest, context: ServicerContext
    ) -> AsyncIterator[thread_service_pb2.ReceiveMessagesResponse]:
        agent_id = require_id("agent_id", request.agent_id)
        require_self(agent_id, "agent_id")
        consumer = require_client_id("consumer", request.consumer, "default")
        agent = await self._agents.agent(agent_id)
        project_id = agent.project_id
        await self._store.ensure_group(project_id, agent_id)
        token = secrets.token_hex(8)
        if not await self._store.acquire_lease(
            project_id, agent_id, consumer, token, tuning.INBOX_LEASE_MS
        ):
            raise errors.ServiceError(
                f"consumer {consumer!r} of agent {agent_id!r} is already receiving elsewhere",
                reason="INBOX_BUSY", code=grpc.StatusCode.ABORTED,
            )  # fmt: skip
        inbox = _Inbox(
            self._store, project_id, agent_id, consumer, self._settings.inbox_claim_idle_s
        )
        status, checked = agent.status, time.monotonic()
        try:  # from here on the lease is given back however the stream ends
            stream = await stream_open(context, self._stopping)  # (a client may go meanwhile)
            while stream.active:
                await self._store.acquire_lease(
                    project_id, agent_id, consumer, token, tuning.INBOX_LEASE_MS
                )
                if time.monotonic() - checked > tuning.STATUS_CHECK_S:
                    status, checked = (await self._agents.agent(agent_id)).status, time.monotonic()
                if status == TERMINATED:
                    return
                if status == PAUSED:  # nothing is delivered until the agent is resumed
                    await asyncio.sleep(0.25)
                    continue
                for delivery in await stream.unless_stopping(inbox.next(), []):
                    yield thread_service_pb2.ReceiveMessagesResponse(
                        message=message_of(delivery.message),
                        ack_id=delivery.ack_id,
                        delivery_count=delivery.count,
                    )
        finally:
            # Deliveries this stream took but nobody acknowledged (an entry read while its
            # caller was leaving included) go to the agent's live consumers at their next
            # claim, not after the idle time.
            idle_ms = int(self._settings.inbox_claim_idle_s * 1000)
            await self._store.give_back(project_id, agent_id, consumer, idle_ms)
            await self._store.release_lease(project_id, agent_id, consumer, token)

    async def AckMessages(
        self, request: thread_service_pb2.AckMessagesRequest, context: ServicerContext
    ) -> thread_service_pb2.AckMessagesResponse:
        agent_id = require_id("agent_id", request.agent_id)
        require_self(agent_id, "agent_id")
        agent = await self._agents.agent(agent_id)
        if not request.ack_ids:
            raise errors.invalid_argument("ack_ids", "names no delivery")
        for position, ack_id in enumerate(request.ack_ids):
            require_text(f"ack_ids[{position}]", ack_id, MAX_ID_LENGTH)
            left, _, right = ack_id.partition("-")
            if not (left.isdigit() and right.isdigit()):
                raise errors.invalid_argument("ack_ids", f"{ack_id!r} is not an ack id")
        return thread_service_pb2.AckMessagesResponse(
            acked_count=await self._store.ack(agent.project_id, agent_id, list(request.ack_ids))
        )

    async def WatchThread(
        self, request: thread_service_pb2.WatchThreadRequest, context: ServicerContext
    ) -> AsyncIterator[thread_service_pb2.WatchThreadResponse]:
        thread_id = request.thread_id
        await self._thread(thread_id)
        after = await self._store.last_entry(thread_id)
        stream = await stream_open(context, self._stopping)
        while stream.active:
            for event in await self._store.read_log(thread_id, after, tuning.STREAM_BLOCK_MS):
                after = event.entry_id
                if event.message is not None:
                    yield thread_service_pb2.WatchThreadResponse(message=message_of(event.message))
                    continue
                record = await self._thread(thread_id)
                yield thread_service_pb2.WatchThreadResponse(thread=await self._render(record))
                if event.status in TERMINAL:
                    return  # nothing can follow an end

    # Helpers ------------------------------------------------------------------------

    async def _render(self, record: ThreadRecord) -> thread_pb2.Thread:
        budgets = await self._budgets([record.id])
        return thread_message(record, budgets[record.id])

    async def _budgets(self, thread_ids: list[str]) -> dict[str, int]:
        """Each thread's budget (max_tokens) as the usage service has it now; 0 for none.
        One call for the whole page."""
        if not thread_ids:
            return {}
        reply = await self._peers.usage.BatchGetThreadBudgets(
            usage_service_pb2.BatchGetThreadBudgetsRequest(thread_ids=thread_ids)
        )
        return {b.thread_id: int(b.max_tokens) for b in reply.budgets}

    async def _thread(self, thread_id: str) -> ThreadRecord:
        found = await self._store.get_thread(require_id("thread_id", thread_id))
        # A thread of a project the caller cannot see answers as though it did not exist.
        if found is None or not await self._agents.can_see_project(found.project_id):
            raise errors.not_found("thread", thread_id)
        return found

    def _json(self, field: str, value: struct_pb2.Struct) -> str:
        text = json_format.MessageToJson(value, indent=None)
        if len(text.encode()) > self._settings.max_payload_bytes:
            raise errors.invalid_argument(
                field, f"is larger than {self._settings.max_payload_bytes} bytes"
            )
        return text
