"""Redis storage of threads, their message logs, and every agent's inbox.

The servicer sees the small typed interface `ThreadStorage` (records, outcomes, pages);
keys, index members, cursors and log entry ids stay in here.

Every key lives under one hash tag, `ap:thread:{t}:`, so that posting a message — the
request-id check, the thread's log and count, the recipient's inbox, the agents'
indexes — is one atomic Lua script on a standalone Redis or a Redis Cluster alike. The
price is that the thread service's data sits in one cluster slot; see the README.

- a thread is a hash, its participants a set, its messages (and status changes) a stream;
- each agent's inbox is a stream read through a consumer group, so a message is delivered
  to one live consumer at a time and stays pending until acknowledged;
- listings read sorted sets whose members sort by creation time (ULIDs, or log entry ids
  zero-padded).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from redis.exceptions import ResponseError

from services.common.convert import new_id, now_ms
from services.common.pagination import Page, read_lex_page
from services.common.redis import RedisClient, load_script

PREFIX = "ap:thread:{t}:"
ALL = "-"
ACTIVE = "ACTIVE"
GROUP = "inbox"
LUA = Path(__file__).with_name("lua")


class Outcome(enum.Enum):
    OK = "OK"
    DUPLICATE = "DUPLICATE"  # the request id was seen: the first result is returned
    SAME = "SAME"  # the thread already has the status asked for
    NO_THREAD = "NO_THREAD"
    NOT_ACTIVE = "NOT_ACTIVE"
    RETRY = "RETRY"  # the thread changed while being ended; try again


@dataclass(frozen=True, slots=True)
class NewThread:
    id: str
    project_id: str
    title: str
    metadata_json: str
    participants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    id: str
    project_id: str
    title: str
    status: str  # ACTIVE, COMPLETED, FAILED, KILLED
    metadata_json: str
    message_count: int
    create_ms: int
    update_ms: int
    end_ms: int | None
    participants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NewMessage:
    message_id: str
    thread_id: str
    from_agent: str
    to_agent: str
    payload_type: str
    payload_json: str
    sender_is_agent: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    thread_id: str
    from_agent: str
    to_agent: str
    payload_type: str
    payload_json: str
    ms: int
    entry_id: str  # its place in the thread's log


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A client's request id, within a scope (e.g. "inject", or "post:<thread id>")."""

    scope: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Posted:
    outcome: Outcome  # OK, DUPLICATE, NO_THREAD or NOT_ACTIVE
    message: StoredMessage | None = None  # OK or DUPLICATE
    status: str = ""  # NOT_ACTIVE: the thread's status


@dataclass(frozen=True, slots=True)
class Ended:
    outcome: Outcome  # OK, SAME, NO_THREAD, NOT_ACTIVE or RETRY
    status: str = ""  # the status before


@dataclass(frozen=True, slots=True)
class LogEvent:
    """An entry of a thread's log: a message, or a change of the thread's status."""

    entry_id: str
    message: StoredMessage | None
    status: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    ack_id: str
    message: StoredMessage
    count: int  # how many times it was delivered, this one included


class ThreadStorage(Protocol):
    """What the thread service needs from its storage."""

    async def create_thread(self, thread: NewThread) -> bool: ...
    async def get_thread(self, thread_id: str) -> ThreadRecord | None: ...
    async def list_threads(
        self, project_id: str, agent_id: str, status: str, page: Page
    ) -> tuple[list[ThreadRecord], str, int]: ...
    async def end_thread(self, thread_id: str, target: str, reason: str) -> Ended: ...
    async def post(self, message: NewMessage, request: RequestKey | None) -> Posted: ...
    async def earlier_message(self, request: RequestKey) -> StoredMessage | None: ...
    async def thread_messages(
        self, thread_id: str, page: Page
    ) -> tuple[list[StoredMessage], str]: ...
    async def thread_agent_messages(
        self, thread_id: str, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]: ...
    async def agent_messages(
        self, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]: ...
    async def latest_messages(self, thread_id: str, count: int) -> list[StoredMessage]: ...
    async def last_entry(self, thread_id: str) -> str: ...
    async def read_log(self, thread_id: str, after: str, block_ms: int) -> list[LogEvent]: ...
    async def ensure_group(self, agent_id: str) -> None: ...
    async def acquire_lease(
        self, agent_id: str, consumer: str, token: str, ttl_ms: int
    ) -> bool: ...
    async def release_lease(self, agent_id: str, consumer: str, token: str) -> None: ...
    async def deliveries(
        self, agent_id: str, consumer: str, pending: bool, block_ms: int
    ) -> list[Delivery]: ...
    async def claim_idle(
        self, agent_id: str, consumer: str, min_idle_ms: int
    ) -> list[Delivery]: ...
    async def ack(self, agent_id: str, ack_ids: Sequence[str]) -> int: ...


class Keys:
    @staticmethod
    def thread(thread_id: str) -> str:
        return f"{PREFIX}thread:{thread_id}"

    @staticmethod
    def participants(thread_id: str) -> str:
        return f"{PREFIX}parts:{thread_id}"

    @staticmethod
    def log(thread_id: str) -> str:
        return f"{PREFIX}log:{thread_id}"

    @staticmethod
    def project_index(project_id: str, status: str = "") -> str:
        return f"{PREFIX}idx:p:{project_id}:{status or 'ALL'}"

    @staticmethod
    def agent_index(agent_id: str, status: str = "") -> str:
        return f"{PREFIX}idx:a:{agent_id}:{status or 'ALL'}"

    @staticmethod
    def messages_of(agent_id: str) -> str:
        return f"{PREFIX}msgs:{agent_id}"

    @staticmethod
    def thread_messages_of(thread_id: str, agent_id: str) -> str:
        return f"{PREFIX}tmsgs:{thread_id}:{agent_id}"

    @staticmethod
    def inbox(agent_id: str) -> str:
        return f"{PREFIX}inbox:{agent_id}"

    @staticmethod
    def request(request: RequestKey | None) -> str:
        if request is None:
            return f"{PREFIX}req:none:-"  # a key the post script is given but does not use
        return f"{PREFIX}req:{request.scope}:{request.request_id}"

    @staticmethod
    def lease(agent_id: str, consumer: str) -> str:
        return f"{PREFIX}lease:{agent_id}:{consumer}"


def _thread_record(fields: dict[str, str], participants: set[str]) -> ThreadRecord:
    return ThreadRecord(
        id=fields["id"],
        project_id=fields.get("project_id", ""),
        title=fields.get("title", ""),
        status=fields["status"],
        metadata_json=fields.get("metadata", ""),
        message_count=int(fields.get("message_count", 0)),
        create_ms=int(fields.get("create_ms", 0)),
        update_ms=int(fields.get("update_ms", 0)),
        end_ms=int(fields["end_ms"]) if fields.get("end_ms") else None,
        participants=tuple(sorted(participants)),
    )


def _message(entry_id: str, fields: dict[str, str], thread_id: str) -> StoredMessage:
    """A message from a log or inbox entry (inbox entries name their thread and log entry)."""
    return StoredMessage(
        id=fields["id"],
        thread_id=fields.get("thread_id", thread_id),
        from_agent=fields.get("from", ""),
        to_agent=fields.get("to", ""),
        payload_type=fields.get("type", ""),
        payload_json=fields.get("payload", ""),
        ms=int(fields.get("ms", 0)),
        entry_id=fields.get("entry", entry_id),
    )


def _entry_member(member: str) -> str:
    """A per-thread index member (zero-padded "ms-seq") back to its log entry id."""
    ms, _, seq = member.partition("-")
    return f"{int(ms)}-{int(seq)}"


class ThreadStore:
    def __init__(
        self, redis: RedisClient, request_ttl_s: int, streams: RedisClient | None = None
    ) -> None:
        self._redis = redis
        self._streams = streams or redis  # blocking reads of server streams
        self._request_ttl_s = request_ttl_s
        self._create = load_script(redis, LUA / "create_thread.lua")
        self._post = load_script(redis, LUA / "post_message.lua")
        self._end = load_script(redis, LUA / "end_thread.lua")

    # Threads ------------------------------------------------------------------------

    async def create_thread(self, thread: NewThread) -> bool:
        """False when a thread with that id exists already."""
        now = str(now_ms())
        member = f"{new_id()}|{thread.id}"  # index member: sorts by creation time
        fields = {
            "id": thread.id, "project_id": thread.project_id, "title": thread.title,
            "status": ACTIVE, "metadata": thread.metadata_json, "message_count": "0",
            "create_ms": now, "update_ms": now, "member": member,
        }  # fmt: skip
        keys = [
            Keys.thread(thread.id), Keys.participants(thread.id),
            Keys.project_index(thread.project_id), Keys.project_index(thread.project_id, ACTIVE),
            Keys.project_index(ALL), Keys.project_index(ALL, ACTIVE),
        ]  # fmt: skip
        for agent_id in thread.participants:
            keys += [Keys.agent_index(agent_id), Keys.agent_index(agent_id, ACTIVE)]
        flat = [item for pair in fields.items() for item in pair]
        args = [member, len(thread.participants), *thread.participants, *flat]
        return bool(await self._create(keys=keys, args=args))

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        (found,) = await self._get_threads([thread_id])
        return found

    async def _get_threads(self, thread_ids: Sequence[str]) -> list[ThreadRecord | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id in thread_ids:
                pipe.hgetall(Keys.thread(thread_id))
                pipe.smembers(Keys.participants(thread_id))
            replies = await pipe.execute()
        return [
            _thread_record(fields, parts) if fields else None
            for fields, parts in zip(replies[0::2], replies[1::2], strict=True)
        ]

    async def list_threads(
        self, project_id: str, agent_id: str, status: str, page: Page
    ) -> tuple[list[ThreadRecord], str, int]:
        """Newest first: (threads, next page token, total)."""
        key = (
            Keys.agent_index(agent_id, status)
            if agent_id
            else Keys.project_index(project_id, status)
        )
        members, token, total = await read_lex_page(self._redis, key, page, newest_first=True)
        found = await self._get_threads([m.split("|", 1)[1] for m in members])
        return [f for f in found if f is not None], token, total

    async def end_thread(self, thread_id: str, target: str, reason: str) -> Ended:
        """Move an ACTIVE thread to a terminal status."""
        for _ in range(5):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hmget(Keys.thread(thread_id), "project_id", "member")
                pipe.smembers(Keys.participants(thread_id))
                (project_id, member), participants = await pipe.execute()
            if member is None:
                return Ended(Outcome.NO_THREAD)
            keys = [
                Keys.thread(thread_id), Keys.participants(thread_id), Keys.log(thread_id),
                Keys.project_index(project_id, ACTIVE), Keys.project_index(project_id, target),
                Keys.project_index(ALL, ACTIVE), Keys.project_index(ALL, target),
            ]  # fmt: skip
            for agent_id in sorted(participants):
                keys += [Keys.agent_index(agent_id, ACTIVE), Keys.agent_index(agent_id, target)]
            reply = await self._end(
                keys=keys, args=[target, now_ms(), member, len(participants), reason]
            )
            if reply[0] != Outcome.RETRY.value:
                return Ended(Outcome(reply[0]), reply[1] if len(reply) > 1 else "")
        return Ended(Outcome.RETRY)

    # Messages -----------------------------------------------------------------------

    async def post(self, message: NewMessage, request: RequestKey | None) -> Posted:
        """Append to the thread's log and the recipient's inbox, atomically."""
        sender = message.from_agent
        keys = [
            Keys.thread(message.thread_id), Keys.participants(message.thread_id),
            Keys.log(message.thread_id), Keys.request(request),
            Keys.inbox(message.to_agent), Keys.messages_of(message.to_agent),
            Keys.messages_of(sender),
            Keys.agent_index(message.to_agent), Keys.agent_index(message.to_agent, ACTIVE),
            Keys.agent_index(sender), Keys.agent_index(sender, ACTIVE),
            Keys.thread_messages_of(message.thread_id, message.to_agent),
            Keys.thread_messages_of(message.thread_id, sender),
        ]  # fmt: skip
        args = [
            "1" if request else "0", self._request_ttl_s, message.message_id, sender,
            message.to_agent, message.payload_type, message.payload_json, now_ms(),
            message.thread_id, "1" if message.sender_is_agent else "0",
        ]  # fmt: skip
        reply = await self._post(keys=keys, args=args)
        outcome = Outcome(reply[0])
        if outcome in (Outcome.OK, Outcome.DUPLICATE):
            return Posted(outcome, await self._message_at(reply[1]))
        return Posted(outcome, status=reply[1] if len(reply) > 1 else "")

    async def earlier_message(self, request: RequestKey) -> StoredMessage | None:
        """The message an earlier call with this request id posted, if any."""
        ref = await self._redis.get(Keys.request(request))
        return await self._message_at(ref) if ref else None

    async def _message_at(self, ref: str) -> StoredMessage | None:
        """A message by its ref, "thread id|log entry id|message id"."""
        thread_id, entry_id, _message_id = ref.split("|")
        (found,) = await self._entries([(thread_id, entry_id)])
        return found

    async def _entries(self, refs: Sequence[tuple[str, str]]) -> list[StoredMessage | None]:
        """Messages by (thread id, log entry id)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id, entry_id in refs:
                pipe.xrange(Keys.log(thread_id), entry_id, entry_id)
            replies = await pipe.execute()
        return [
            _message(reply[0][0], dict(reply[0][1]), thread_id) if reply else None
            for (thread_id, _), reply in zip(refs, replies, strict=True)
        ]

    async def thread_messages(self, thread_id: str, page: Page) -> tuple[list[StoredMessage], str]:
        """A page of a thread's messages, oldest first: (messages, next page token)."""
        start = f"({page.cursor}" if page.cursor else "-"
        want = page.skip + page.size + 1
        entries = await self._redis.xrange(Keys.log(thread_id), start, "+", count=want)
        found = [_message(e, dict(f), thread_id) for e, f in entries if f.get("kind") == "message"][
            page.skip :
        ]
        more = len(found) > page.size or len(entries) == want
        found = found[: page.size]
        return found, page.token_after(found[-1].entry_id) if more and found else ""

    async def thread_agent_messages(
        self, thread_id: str, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]:
        """The messages from or to one agent in one thread, oldest first, exact pages:
        (messages, next page token, total)."""
        members, token, total = await read_lex_page(
            self._redis, Keys.thread_messages_of(thread_id, agent_id), page, newest_first=False
        )
        found = await self._entries([(thread_id, _entry_member(m)) for m in members])
        return [m for m in found if m is not None], token, total

    async def agent_messages(
        self, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]:
        """An agent's messages across threads, newest first: (messages, token, total)."""
        members, token, total = await read_lex_page(
            self._redis, Keys.messages_of(agent_id), page, newest_first=True
        )
        refs = [(parts[1], parts[2]) for parts in (m.split("|") for m in members)]
        found = await self._entries(refs)
        return [m for m in found if m is not None], token, total

    async def latest_messages(self, thread_id: str, count: int) -> list[StoredMessage]:
        entries = await self._redis.xrevrange(Keys.log(thread_id), "+", "-", count=count + 4)
        found = [_message(e, dict(f), thread_id) for e, f in entries if f.get("kind") == "message"]
        return list(reversed(found[:count]))

    async def last_entry(self, thread_id: str) -> str:
        """Where a watcher starts: after the log's last entry."""
        latest = await self._redis.xrevrange(Keys.log(thread_id), count=1)
        return latest[0][0] if latest else "0-0"

    async def read_log(self, thread_id: str, after: str, block_ms: int) -> list[LogEvent]:
        reply = await self._streams.xread({Keys.log(thread_id): after}, count=100, block=block_ms)
        events = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                if fields.get("kind") == "message":
                    events.append(LogEvent(entry_id, _message(entry_id, dict(fields), thread_id)))
                else:
                    events.append(LogEvent(entry_id, None, fields.get("status", "")))
        return events

    # Inbox --------------------------------------------------------------------------

    async def ensure_group(self, agent_id: str) -> None:
        """The inbox's consumer group, created from the start of the stream on first use."""
        try:
            await self._redis.xgroup_create(Keys.inbox(agent_id), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def acquire_lease(self, agent_id: str, consumer: str, token: str, ttl_ms: int) -> bool:
        """Hold (or renew) the right to serve one consumer of an agent's inbox."""
        key = Keys.lease(agent_id, consumer)
        if await self._redis.set(key, token, nx=True, px=ttl_ms):
            return True
        if await self._redis.get(key) == token:
            await self._redis.pexpire(key, ttl_ms)
            return True
        return False

    async def release_lease(self, agent_id: str, consumer: str, token: str) -> None:
        key = Keys.lease(agent_id, consumer)
        if await self._redis.get(key) == token:
            await self._redis.delete(key)

    async def deliveries(
        self, agent_id: str, consumer: str, pending: bool, block_ms: int
    ) -> list[Delivery]:
        """This consumer's unacknowledged deliveries (pending=True) or new messages."""
        reply = await self._streams.xreadgroup(
            GROUP, consumer, {Keys.inbox(agent_id): "0" if pending else ">"},
            count=100, block=None if pending else block_ms,
        )  # fmt: skip
        entries = [(e, dict(f)) for _s, got in reply or () for e, f in got if f]
        return await self._with_counts(agent_id, entries)

    async def claim_idle(self, agent_id: str, consumer: str, min_idle_ms: int) -> list[Delivery]:
        """Take over deliveries left unacknowledged by consumers idle for min_idle_ms."""
        reply = await self._redis.xautoclaim(
            Keys.inbox(agent_id), GROUP, consumer, min_idle_ms, start_id="0-0", count=100
        )
        return await self._with_counts(agent_id, [(e, dict(f)) for e, f in reply[1] if f])

    async def _with_counts(
        self, agent_id: str, entries: list[tuple[str, dict[str, str]]]
    ) -> list[Delivery]:
        if not entries:
            return []
        ids = [e for e, _ in entries]
        rows = await self._redis.xpending_range(
            Keys.inbox(agent_id), GROUP, min=min(ids), max=max(ids), count=len(ids) + 100
        )
        counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        return [
            Delivery(ack_id=e, message=_message(e, f, f.get("thread_id", "")),
                     count=counts.get(e, 1))
            for e, f in entries
        ]  # fmt: skip

    async def ack(self, agent_id: str, ack_ids: Sequence[str]) -> int:
        return int(await self._redis.xack(Keys.inbox(agent_id), GROUP, *ack_ids))


_: type[ThreadStorage] = ThreadStore  # the store keeps to its interface (checked by mypy)
