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

from agentplane.agent.v1 import agent_pb2, agent_service_pb2
from agentplane.thread.v1 import thread_pb2, thread_service_pb2, thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2
from services.common import errors
from services.common.access import Visibility, require_manager, require_self, require_superuser
from services.common.clients import PeerClients
from services.common.convert import new_id, now_ms, require_id, require_text, timestamp
from services.common.interceptors import stream_open
from services.common.limits import MAX_BUDGET_TOKENS as MAX_BUDGET
from services.common.limits import MAX_PARTICIPANTS
from services.common.logging import get_logger
from services.common.pagination import parse_page
from services.common.settings import Settings
from services.thread_svc.store import ALL, Keys, NewMessage, ThreadStore

log = get_logger("agentplane.thread")

OPERATOR = "operator"

STREAM_BLOCK_MS = 1000
LEASE_MS = 5000
STATUS_CHECK_S = 1.0
TERMINAL = {"COMPLETED", "FAILED", "KILLED"}
PAUSED = agent_pb2.AGENT_STATUS_PAUSED
TERMINATED = agent_pb2.AGENT_STATUS_TERMINATED


def thread_status_name(value: int) -> str:
    if value not in thread_pb2.ThreadStatus.values():
        raise errors.invalid_argument("status", f"{value} is not a thread status")
    return thread_pb2.ThreadStatus.Name(value).removeprefix("THREAD_STATUS_")  # type: ignore[arg-type]


def thread_message(
    record: dict[str, str], participants: list[str], max_tokens: int
) -> thread_pb2.Thread:
    """A thread as the API shows it; `max_tokens` comes from its budget (the usage service
    is the one source of truth for it)."""
    thread = thread_pb2.Thread(
        id=record["id"],
        project_id=record.get("project_id", ""),
        title=record.get("title", ""),
        status=thread_pb2.ThreadStatus.Value("THREAD_STATUS_" + record["status"]),  # type: ignore[arg-type]
        participants=participants,
        message_count=int(record.get("message_count", 0)),
        max_tokens=max_tokens,
        create_time=timestamp(record.get("create_ms")),
        update_time=timestamp(record.get("update_ms")),
        end_time=timestamp(record.get("end_ms")),
    )
    if record.get("metadata"):
        json_format.Parse(record["metadata"], thread.metadata)
    return thread


def message_of(fields: dict[str, str], thread_id: str) -> thread_pb2.Message:
    message = thread_pb2.Message(
        id=fields["id"],
        thread_id=fields.get("thread_id", thread_id),
        from_agent=fields.get("from", ""),
        to_agent=fields.get("to", ""),
        payload_type=fields.get("type", ""),
        create_time=timestamp(fields.get("ms")),
    )
    if fields.get("payload"):
        json_format.Parse(fields["payload"], message.payload)
    return message


class ThreadServicer(thread_service_pb2_grpc.ThreadServiceServicer):
    def __init__(
        self, store: ThreadStore, peers: PeerClients, settings: Settings, stopping: asyncio.Event
    ) -> None:
        self._store = store
        self._peers = peers
        self._settings = settings
        self._stopping = stopping
        self._visibility = Visibility(peers, settings.auth_cache_s)

    # Threads ------------------------------------------------------------------------

    async def CreateThread(self, request, context):  # type: ignore[no-untyped-def]
        require_manager()
        spec = request.thread
        project_id = require_id("thread.project_id", spec.project_id)
        thread_id = require_id("thread_id", request.thread_id) if request.thread_id else new_id()
        title = require_text("thread.title", spec.title, 200)
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
        await self._peers.agent.GetProject(
            agent_service_pb2.GetProjectRequest(project_id=project_id)
        )
        # Participants are agents of the thread's project (so an agent's threads are all in
        # its own project, which the indexes rely on).
        members = await asyncio.gather(*(self._visibility.agent(p) for p in participants))
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
        now = str(now_ms())
        fields = {
            "id": thread_id, "project_id": project_id, "title": title, "status": "ACTIVE",
            "metadata": metadata, "message_count": "0",
            "create_ms": now, "update_ms": now, "member": f"{new_id()}|{thread_id}",
        }  # fmt: skip
        if not await self._store.create_thread(fields, participants, fields["member"]):
            raise errors.already_exists("thread", thread_id)
        return thread_message(fields, participants, budget.max_tokens)

    async def GetThread(self, request, context):  # type: ignore[no-untyped-def]
        if request.message_limit < 0:
            raise errors.invalid_argument("message_limit", "must not be negative")
        record, participants = await self._thread(request.thread_id)
        latest = await self._store.latest_messages(
            record["id"], min(request.message_limit or 20, 100)
        )
        return thread_service_pb2.GetThreadResponse(
            thread=await self._render(record, participants),
            messages=[message_of(m, record["id"]) for m in latest],
        )

    async def ListThreads(self, request, context):  # type: ignore[no-untyped-def]
        project_id = request.project_id or ALL
        if project_id != ALL:
            require_id("project_id", project_id)
        agent_id = require_id("agent", request.agent) if request.agent else ""
        status = thread_status_name(request.status) if request.status else ""
        if agent_id:
            agent = await self._agent(agent_id, "agent")
            if project_id not in (ALL, agent.project_id):
                # An agent's threads are all in its own project: another project has none.
                return thread_service_pb2.ListThreadsResponse()
        elif project_id == ALL:
            require_superuser("listing threads of every project")
        elif not await self._visibility.project(project_id):
            raise errors.not_found("project", project_id)
        page = parse_page(
            request.page_size, request.page_token, request.skip,
            ("threads", project_id, agent_id, status), default_size=50,
        )  # fmt: skip
        found, token, total = await self._store.list_threads(project_id, agent_id, status, page)
        budgets = await self._budgets([r["id"] for r, _ in found])
        return thread_service_pb2.ListThreadsResponse(
            threads=[thread_message(r, p, budgets[r["id"]]) for r, p in found],
            next_page_token=token,
            total_size=total,
        )

    async def KillThread(self, request, context):  # type: ignore[no-untyped-def]
        reason = require_text("reason", request.reason, 1000)
        return await self._end(request.thread_id, "KILLED", reason)

    async def CompleteThread(self, request, context):  # type: ignore[no-untyped-def]
        return await self._end(request.thread_id, "FAILED" if request.failed else "COMPLETED", "")

    async def _end(self, thread_id: str, target: str, reason: str) -> thread_pb2.Thread:
        require_manager()
        await self._thread(thread_id)
        outcome, current = await self._store.end_thread(thread_id, target, reason)
        if outcome == "NO_THREAD":
            raise errors.not_found("thread", thread_id)
        if outcome == "NOT_ACTIVE":
            raise errors.failed_precondition(
                f"thread {thread_id!r} already ended as {current}", "THREAD_ENDED", status=current
            )
        if outcome == "RETRY":
            raise errors.ServiceError(
                "thread is changing, retry", reason="CONFLICT", code=grpc.StatusCode.ABORTED
            )
        # OK or SAME (a retry): either way the budget must end up closed.
        try:
            await self._peers.usage.CloseThreadBudget(
                usage_service_pb2.CloseThreadBudgetRequest(thread_id=thread_id)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        record, participants = await self._thread(thread_id)
        return await self._render(record, participants)

    # Messages -----------------------------------------------------------------------

    async def ListMessages(self, request, context):  # type: ignore[no-untyped-def]
        thread_id = request.thread_id or ALL
        agent_id = require_id("agent", request.agent) if request.agent else ""
        page = parse_page(
            request.page_size, request.page_token, request.skip, ("messages", thread_id, agent_id)
        )
        if thread_id == ALL and not agent_id:
            raise errors.invalid_argument("agent", "is required when listing across threads ('-')")
        if agent_id:
            # Filtered listings read an index of the agent's messages (across threads, or in
            # this thread), so pages are full and total_size counts what the filter keeps.
            if thread_id == ALL:
                await self._agent(agent_id, "agent")
                refs, token, total = await self._store.agent_messages(agent_id, page)
            else:
                await self._thread(thread_id)
                refs, token, total = await self._store.thread_agent_messages(
                    thread_id, agent_id, page
                )
            entries = await self._store.entries(refs)
            messages = [message_of(e, t) for (t, _), e in zip(refs, entries, strict=True) if e]
            return thread_service_pb2.ListMessagesResponse(
                messages=messages, next_page_token=token, total_size=total
            )
        record, _ = await self._thread(thread_id)
        found, more = await self._store.thread_messages(
            thread_id, page.cursor, page.skip, page.size
        )
        return thread_service_pb2.ListMessagesResponse(
            messages=[message_of(fields, thread_id) for _, fields in found],
            next_page_token=page.token_after(found[-1][0]) if more and found else "",
            total_size=int(record.get("message_count", 0)),
        )

    async def PostMessage(self, request, context):  # type: ignore[no-untyped-def]
        thread_id = require_id("thread_id", request.thread_id)
        sender = require_id("from_agent", request.from_agent)
        require_self(sender, "from_agent")
        recipient = require_id("to_agent", request.to_agent)
        message = self._new_message(
            thread_id, sender, recipient, request.payload_type, request.payload, True
        )
        request_key = (
            Keys.request(f"post:{thread_id}", require_id("request_id", request.request_id))
            if request.request_id
            else None
        )
        if request_key and (ref := await self._store.request_ref(request_key)):
            return await self._message_by_ref(ref)
        (record, _), sender_agent, recipient_agent = await asyncio.gather(
            self._thread(thread_id),
            self._agent(sender, "from_agent"),
            self._agent(recipient, "to_agent"),
        )
        if sender_agent.status in (PAUSED, TERMINATED):
            status = agent_pb2.AgentStatus.Name(sender_agent.status).removeprefix("AGENT_STATUS_")
            raise errors.failed_precondition(
                f"sender {sender!r} is {status} and cannot post", "SENDER_NOT_ACTIVE", status=status
            )
        if recipient_agent.status == TERMINATED:
            raise errors.failed_precondition(
                f"recipient {recipient!r} is TERMINATED", "RECIPIENT_TERMINATED", agent=recipient
            )
        if recipient not in sender_agent.peers:
            raise errors.permission_denied(
                f"{recipient!r} is not one of {sender!r}'s peers", "NOT_A_PEER"
            )
        for agent in (sender_agent, recipient_agent):
            if agent.project_id != record["project_id"]:
                raise errors.failed_precondition(
                    f"agent {agent.id!r} is not in the thread's project", "AGENT_NOT_IN_PROJECT"
                )
        return await self._post(message, record["member"], request_key)

    async def InjectMessage(self, request, context):  # type: ignore[no-untyped-def]
        require_manager()
        target = require_id("to", request.to)
        request_key = (
            Keys.request("inject", require_id("request_id", request.request_id))
            if request.request_id
            else None
        )
        if request_key and (ref := await self._store.request_ref(request_key)):
            message = await self._message_by_ref(ref)
            return thread_service_pb2.InjectMessageResponse(
                thread_id=message.thread_id, message_id=message.id
            )
        thread_id = require_id("thread_id", request.thread_id) if request.thread_id else ""
        # Checked before any write: the payload, then the target.
        message = self._new_message(
            thread_id or "-", OPERATOR, target, request.payload_type, request.payload, False
        )
        try:
            agent = await self._peers.agent.GetAgent(
                agent_service_pb2.GetAgentRequest(
                    agent_id=target, view=agent_service_pb2.AGENT_VIEW_BASIC
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.invalid_argument(
                    "to", f"no agent {target!r}", "UNKNOWN_AGENT"
                ) from None
            raise
        if agent.status == TERMINATED:
            raise errors.failed_precondition(
                f"recipient {target!r} is TERMINATED", "RECIPIENT_TERMINATED", agent=target
            )
        if thread_id:
            record, _ = await self._thread(thread_id)
            if record["project_id"] != agent.project_id:
                raise errors.failed_precondition(
                    f"agent {target!r} is not in the thread's project", "AGENT_NOT_IN_PROJECT"
                )
            member = record["member"]
        else:
            thread = await self._create(
                new_id(), agent.project_id, f"operator → {agent.name}", [target], "",
                self._settings.default_max_tokens,
            )  # fmt: skip
            thread_id = thread.id
            record, _ = await self._thread(thread_id)
            member = record["member"]
        posted = await self._post(
            dataclasses.replace(message, thread_id=thread_id), member, request_key
        )
        return thread_service_pb2.InjectMessageResponse(
            thread_id=posted.thread_id, message_id=posted.id
        )

    def _new_message(
        self, thread_id: str, sender: str, recipient: str, payload_type: str,
        payload: struct_pb2.Struct, sender_is_agent: bool,
    ) -> NewMessage:  # fmt: skip
        kind = require_text("payload_type", payload_type, 64) or "text"
        return NewMessage(
            message_id=new_id(), thread_id=thread_id, from_agent=sender, to_agent=recipient,
            payload_type=kind, payload_json=self._json("payload", payload),
            sender_is_agent=sender_is_agent,
        )  # fmt: skip

    async def _post(
        self, message: NewMessage, member: str, request_key: str | None
    ) -> thread_pb2.Message:
        outcome, detail = await self._store.post(message, member, request_key)
        if outcome == "NO_THREAD":
            raise errors.not_found("thread", message.thread_id)
        if outcome == "NOT_ACTIVE":
            raise errors.failed_precondition(
                f"thread {message.thread_id!r} is {detail}, not ACTIVE",
                "THREAD_NOT_ACTIVE",
                status=detail,
            )
        return await self._message_by_ref(detail)

    async def _message_by_ref(self, ref: str) -> thread_pb2.Message:
        thread_id, entry_id, _message_id = ref.split("|")
        (fields,) = await self._store.entries([(thread_id, entry_id)])
        if fields is None:
            raise errors.not_found("message", ref)
        return message_of(fields, thread_id)

    # Streams ------------------------------------------------------------------------

    async def ReceiveMessages(
        self, request, context
    ) -> AsyncIterator[thread_service_pb2.ReceiveMessagesResponse]:  # type: ignore[no-untyped-def]
        agent_id = require_id("agent_id", request.agent_id)
        require_self(agent_id, "agent_id")
        consumer = require_id("consumer", request.consumer) if request.consumer else "default"
        agent = await self._agent(agent_id, "agent_id")
        await self._store.ensure_group(agent_id)
        token = secrets.token_hex(8)
        if not await self._store.acquire_lease(agent_id, consumer, token, LEASE_MS):
            raise errors.ServiceError(
                f"consumer {consumer!r} of agent {agent_id!r} is already receiving elsewhere",
                reason="INBOX_BUSY", code=grpc.StatusCode.ABORTED,
            )  # fmt: skip
        await stream_open(context)
        claim_idle_ms = int(self._settings.inbox_claim_idle_s * 1000)
        status, checked = agent.status, time.monotonic()
        first, last_claim = True, time.monotonic()
        try:
            while not self._stopping.is_set():
                await self._store.acquire_lease(agent_id, consumer, token, LEASE_MS)
                if time.monotonic() - checked > STATUS_CHECK_S:
                    status, checked = (
                        (await self._agent(agent_id, "agent_id")).status,
                        time.monotonic(),
                    )
                if status == TERMINATED:
                    return
                if status == PAUSED:  # nothing is delivered until the agent is resumed
                    await asyncio.sleep(0.25)
                    continue
                counts: dict[str, int] = {}
                if first:
                    # What this consumer was sent before but never acknowledged comes first.
                    entries = await self._store.read_inbox(agent_id, consumer, True, 0)
                    first = False
                else:
                    entries = await self._store.read_inbox(
                        agent_id, consumer, False, STREAM_BLOCK_MS
                    )
                if not entries and time.monotonic() - last_claim > min(claim_idle_ms / 1000, 5.0):
                    # Deliveries left unacknowledged too long (a consumer vanished) move here.
                    entries = await self._store.claim_idle(agent_id, consumer, claim_idle_ms)
                    last_claim = time.monotonic()
                if entries:
                    counts = await self._store.delivery_counts(agent_id, [e for e, _ in entries])
                for entry_id, fields in entries:
                    yield thread_service_pb2.ReceiveMessagesResponse(
                        message=message_of(fields, fields.get("thread_id", "")),
                        ack_id=entry_id,
                        delivery_count=counts.get(entry_id, 1),
                    )
        finally:
            await self._store.release_lease(agent_id, consumer, token)

    async def AckMessages(self, request, context):  # type: ignore[no-untyped-def]
        agent_id = require_id("agent_id", request.agent_id)
        require_self(agent_id, "agent_id")
        await self._agent(agent_id, "agent_id")
        if not request.ack_ids:
            raise errors.invalid_argument("ack_ids", "names no delivery")
        for ack_id in request.ack_ids:
            left, _, right = ack_id.partition("-")
            if not (left.isdigit() and right.isdigit()):
                raise errors.invalid_argument("ack_ids", f"{ack_id!r} is not an ack id")
        return thread_service_pb2.AckMessagesResponse(
            acked_count=await self._store.ack(agent_id, list(request.ack_ids))
        )

    async def WatchThread(
        self, request, context
    ) -> AsyncIterator[thread_service_pb2.WatchThreadResponse]:  # type: ignore[no-untyped-def]
        thread_id = request.thread_id
        await self._thread(thread_id)
        after = await self._store.last_entry(thread_id)
        await stream_open(context)
        while not self._stopping.is_set():
            for entry_id, fields in await self._store.read_log(thread_id, after, STREAM_BLOCK_MS):
                after = entry_id
                if fields.get("kind") == "message":
                    yield thread_service_pb2.WatchThreadResponse(
                        message=message_of(fields, thread_id)
                    )
                    continue
                record, participants = await self._thread(thread_id)
                yield thread_service_pb2.WatchThreadResponse(
                    thread=await self._render(record, participants)
                )
                if fields.get("status") in TERMINAL:
                    return  # nothing can follow an end

    # Helpers ------------------------------------------------------------------------

    async def _render(self, record: dict[str, str], participants: list[str]) -> thread_pb2.Thread:
        budgets = await self._budgets([record["id"]])
        return thread_message(record, participants, budgets[record["id"]])

    async def _budgets(self, thread_ids: list[str]) -> dict[str, int]:
        """Each thread's budget (max_tokens) as the usage service has it now; 0 for none."""

        async def one(thread_id: str) -> int:
            try:
                budget = await self._peers.usage.GetThreadBudget(
                    usage_service_pb2.GetThreadBudgetRequest(thread_id=thread_id)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return 0
                raise
            return int(budget.max_tokens)

        found = await asyncio.gather(*(one(t) for t in thread_ids))
        return dict(zip(thread_ids, found, strict=True))

    async def _thread(self, thread_id: str) -> tuple[dict[str, str], list[str]]:
        found = await self._store.get_thread(require_id("thread_id", thread_id))
        # A thread of a project the caller cannot see answers as though it did not exist.
        if found is None or not await self._visibility.project(found[0]["project_id"]):
            raise errors.not_found("thread", thread_id)
        return found

    async def _agent(self, agent_id: str, field: str) -> agent_pb2.Agent:
        try:
            return await self._peers.agent.GetAgent(
                agent_service_pb2.GetAgentRequest(
                    agent_id=agent_id, view=agent_service_pb2.AGENT_VIEW_BASIC
                )
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.not_found("agent", agent_id) from None
            raise

    def _json(self, field: str, value: struct_pb2.Struct) -> str:
        text = json_format.MessageToJson(value, indent=None)
        if len(text.encode()) > self._settings.max_payload_bytes:
            raise errors.invalid_argument(
                field, f"is larger than {self._settings.max_payload_bytes} bytes"
            )
        return text
