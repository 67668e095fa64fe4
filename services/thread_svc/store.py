"""Redis storage of threads, their message logs, and every agent's inbox.

The servicer sees the small typed interface `ThreadStorage` (records, outcomes, pages);
keys, index members, cursors and log entry ids stay in here.

A project's threads, messages, inboxes and indexes live under the project's hash tag,
`ap:thread:{p:<project>}:`, so that posting a message — the request-id check, the
thread's log and count, the recipient's inbox, the agents' indexes — is one atomic Lua
script in one slot, and on Redis Cluster the projects spread over the masters. A thread's
project is found from its directory key (`services/common/partitions.py`); an agent's
threads are all in its own project. Cross-project listings merge the projects' indexes;
the projects that have threads are a small global set (`ap:thread:{t}:projects`).

Memory stays bounded (SPEC §10): an ended thread is queued for removal with everything it
left (removed in bounded steps by `sweep`, on any replica); an acknowledged inbox entry
is deleted; an active thread keeps its newest `THREAD_MAX_MESSAGES` messages.

- a thread is a hash, its participants a set, its messages (and status changes) a stream;
- each agent's inbox is a stream read through a consumer group, so a message is delivered
  to one live consumer at a time and stays pending until acknowledged;
- listings read sorted sets whose members sort by creation time (ULIDs, or log entry ids
  zero-padded).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from redis.exceptions import ResponseError

from services.common import tuning
from services.common.convert import new_id, now_ms
from services.common.installation import FINAL, Installation, Placement
from services.common.pagination import Page, read_lex_page
from services.common.partitions import Directory, project_prefix
from services.common.redis import RedisClient, load_script

SERVICE = "thread"
PREFIX = "ap:thread:{t}:"
ALL = "-"
ACTIVE = "ACTIVE"
STATUSES = (ACTIVE, "COMPLETED", "FAILED", "KILLED")
ACTIVE_SEQ, ENDED_SEQ = 1, 2  # a thread's statuses only move forward: ACTIVE, then ended
GROUP = "inbox"
LUA = Path(__file__).with_name("lua")


class Outcome(enum.Enum):
    OK = "OK"
    DUPLICATE = "DUPLICATE"  # the request id was seen: the first result is returned
    SAME = "SAME"  # the thread already has the status asked for
    NO_THREAD = "NO_THREAD"
    NOT_ACTIVE = "NOT_ACTIVE"


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
    message_count: int  # ever posted
    dropped: int  # of those, dropped past THREAD_MAX_MESSAGES
    create_ms: int
    update_ms: int
    end_ms: int | None
    participants: tuple[str, ...]
    end_reason: str = ""  # what KillThread was told


@dataclass(frozen=True, slots=True)
class NewMessage:
    message_id: str
    thread_id: str
    from_agent: str
    to_agent: str
    payload_type: str
    payload_json: str
    sender_is_agent: bool
    recipient_is_agent: bool = True  # False: an answer to the operator (no inbox)


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
    """A client's request id, within a scope (e.g. "inject", or "post:<thread id>"), kept
    in a project: the thread's (`thread_id`) or the one named (`project_id`)."""

    scope: str
    request_id: str
    thread_id: str = ""
    project_id: str = ""

    @property
    def suffix(self) -> str:
        return f"{self.scope}:{self.request_id}"


@dataclass(frozen=True, slots=True)
class Posted:
    outcome: Outcome  # OK, DUPLICATE, NO_THREAD or NOT_ACTIVE
    message: StoredMessage | None = None  # OK or DUPLICATE
    status: str = ""  # NOT_ACTIVE: the thread's status


@dataclass(frozen=True, slots=True)
class Ended:
    outcome: Outcome  # OK, SAME, NO_THREAD or NOT_ACTIVE
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
    """What the thread service needs from its storage. Agent-keyed calls take the agent's
    project (an agent's inbox and indexes live with its project's threads)."""

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
        self, project_id: str, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]: ...
    async def latest_messages(self, thread_id: str, count: int) -> list[StoredMessage]: ...
    async def last_entry(self, thread_id: str) -> str: ...
    async def read_log(self, thread_id: str, after: str, block_ms: int) -> list[LogEvent]: ...
    async def ensure_group(self, project_id: str, agent_id: str) -> None: ...
    async def acquire_lease(
        self, project_id: str, agent_id: str, consumer: str, token: str, ttl_ms: int
    ) -> bool: ...
    async def release_lease(
        self, project_id: str, agent_id: str, consumer: str, token: str
    ) -> None: ...
    async def deliveries(
        self, project_id: str, agent_id: str, consumer: str, pending: bool, block_ms: int
    ) -> list[Delivery]: ...
    async def claim_idle(
        self, project_id: str, agent_id: str, consumer: str, min_idle_ms: int
    ) -> list[Delivery]: ...
    async def give_back(
        self, project_id: str, agent_id: str, consumer: str, idle_ms: int
    ) -> int: ...
    async def ack(self, project_id: str, agent_id: str, ack_ids: Sequence[str]) -> int: ...


class Keys:
    """Key names, as every service describes them: the installation's own under one tag
    (class attributes), a project's under the project's tag (`Keys(project_id)`, whose
    `prefix` the Lua scripts get and derive the same names from)."""

    projects = PREFIX + "projects"  # the projects that have (had) threads
    everywhere = PREFIX + "all:"  # installation-wide indexes (services/common/installation.py)

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self.prefix = project_prefix(SERVICE, project_id)

    def thread(self, thread_id: str) -> str:
        return f"{self.prefix}thread:{thread_id}"

    def participants(self, thread_id: str) -> str:
        return f"{self.prefix}parts:{thread_id}"

    def log(self, thread_id: str) -> str:
        return f"{self.prefix}log:{thread_id}"

    def project_index(self, status: str = "") -> str:
        return f"{self.prefix}idx:p:{status or 'ALL'}"

    def agent_index(self, agent_id: str, status: str = "") -> str:
        return f"{self.prefix}idx:a:{agent_id}:{status or 'ALL'}"

    def messages_of(self, agent_id: str) -> str:
        return f"{self.prefix}msgs:{agent_id}"

    def thread_messages_of(self, thread_id: str, agent_id: str) -> str:
        return f"{self.prefix}tmsgs:{thread_id}:{agent_id}"

    def inbox(self, agent_id: str) -> str:
        return f"{self.prefix}inbox:{agent_id}"

    def request(self, request: RequestKey) -> str:
        return f"{self.prefix}req:{request.suffix}"

    def lease(self, agent_id: str, consumer: str) -> str:
        return f"{self.prefix}lease:{agent_id}:{consumer}"

    @property
    def ended(self) -> str:
        """The removal queue: ended threads scored by their end time."""
        return f"{self.prefix}ended"


def _thread_record(fields: dict[str, str], participants: set[str]) -> ThreadRecord:
    return ThreadRecord(
        id=fields["id"],
        project_id=fields.get("project_id", ""),
        title=fields.get("title", ""),
        status=fields["status"],
        metadata_json=fields.get("metadata", ""),
        message_count=int(fields.get("message_count", 0)),
        dropped=int(fields.get("dropped", 0)),
        create_ms=int(fields.get("create_ms", 0)),
        update_ms=int(fields.get("update_ms", 0)),
        end_ms=int(fields["end_ms"]) if fields.get("end_ms") else None,
        participants=tuple(sorted(participants)),
        end_reason=fields.get("end_reason", ""),
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
        self, redis: RedisClient, request_ttl_s: int, streams: RedisClient | None = None,
        max_messages: int = 10_000,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._streams = streams or redis  # blocking reads of server streams
        self._request_ttl_s = request_ttl_s
        self._max_messages = max_messages
        self._directory = Directory(redis, SERVICE)
        prelude = LUA / "_prelude.lua"
        self._create = load_script(redis, LUA / "create_thread.lua")
        self._post = load_script(redis, LUA / "post_message.lua", prelude)
        self._end = load_script(redis, LUA / "end_thread.lua")
        self._ack = load_script(redis, LUA / "ack.lua")
        self._remove = load_script(redis, LUA / "remove_thread.lua", prelude)
        self.installation = Installation(redis, Keys.everywhere, STATUSES)

    async def _keys_of(self, thread_id: str) -> Keys | None:
        """The keys of the thread's project (None: no such thread)."""
        project_id = await self._directory.project_of(thread_id)
        return None if project_id is None else Keys(project_id)

    # Threads ------------------------------------------------------------------------

    async def create_thread(self, thread: NewThread) -> bool:
        """False when a thread with that id exists already."""
        if not await self._directory.place(thread.id, thread.project_id):
            return False
        await self._redis.zadd(Keys.projects, {thread.project_id: 0})
        now = str(now_ms())
        member = f"{new_id()}|{thread.id}"  # index member: sorts by creation time
        fields = {
            "id": thread.id, "project_id": thread.project_id, "title": thread.title,
            "status": ACTIVE, "metadata": thread.metadata_json, "message_count": "0",
            "create_ms": now, "update_ms": now, "member": member,
        }  # fmt: skip
        flat = [item for pair in fields.items() for item in pair]
        args = [thread.id, member, len(thread.participants), *thread.participants, *flat]
        keys = Keys(thread.project_id)
        intent = await self.installation.intend(thread.id, member)
        created = bool(await self._create(keys=[keys.prefix], args=args))
        await self.installation.apply(
            Placement(member, ACTIVE, ACTIVE_SEQ) if created else await self.placement(thread.id),
            intent,
        )
        return created

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        project_id = await self._directory.project_of(thread_id)
        if project_id is None:
            return None
        (found,) = await self._get_threads(Keys(project_id), [thread_id])
        if found is None:  # removed, perhaps created again elsewhere: ask the directory
            fresh = await self._directory.project_of(thread_id, fresh=True)
            if fresh is not None and fresh != project_id:
                (found,) = await self._get_threads(Keys(fresh), [thread_id])
        return found

    async def _get_threads(
        self, keys: Keys | Sequence[Keys], thread_ids: Sequence[str]
    ) -> list[ThreadRecord | None]:
        each = [keys] * len(thread_ids) if isinstance(keys, Keys) else list(keys)
        async with self._redis.pipeline(transaction=False) as pipe:
            for k, thread_id in zip(each, thread_ids, strict=True):
                pipe.hgetall(k.thread(thread_id))
                pipe.smembers(k.participants(thread_id))
            replies = await pipe.execute()
        return [
            _thread_record(fields, parts) if fields else None
            for fields, parts in zip(replies[0::2], replies[1::2], strict=True)
        ]

    async def list_threads(
        self, project_id: str, agent_id: str, status: str, page: Page
    ) -> tuple[list[ThreadRecord], str, int]:
        """Newest first: (threads, next page token, total). With an agent, `project_id` is
        the agent's; "-" without one lists every project's."""
        if project_id == ALL:
            members, token, total = await self.installation.page(status, page)
            ids = [m.split("|", 1)[1] for m in members]
            projects = await self._directory.projects_of(ids)
            placed = [(Keys(p), i) for p, i in zip(projects, ids, strict=True) if p is not None]
        else:
            keys = Keys(project_id)
            key = keys.agent_index(agent_id, status) if agent_id else keys.project_index(status)
            members, token, total = await read_lex_page(self._redis, key, page, newest_first=True)
            placed = [(keys, m.split("|", 1)[1]) for m in members]
        found = await self._get_threads([k for k, _ in placed], [i for _, i in placed])
        return [f for f in found if f is not None], token, total

    async def placement(self, thread_id: str) -> Placement:
        """Where the thread stands now, as its project's record says (for the global
        indexes: `Installation.heal`)."""
        project_id = await self._directory.project_of(thread_id, fresh=True)
        if project_id is not None:
            keys = Keys(project_id)
            status, member = await self._redis.hmget(keys.thread(thread_id), "status", "member")
            if status == ACTIVE:
                return Placement(member or "", status, ACTIVE_SEQ)
            if status:
                ended = await self._redis.zscore(keys.ended, thread_id)
                return Placement(member or "", status, ENDED_SEQ, project_id, int(ended or 0))
        return Placement("", "", FINAL)

    async def every_thread(self) -> AsyncIterator[list[str]]:
        """Every thread's id, a project at a time (to index an upgraded installation)."""
        async for chunk in self.partitions():
            for project_id in chunk:
                members = await self._redis.zrange(Keys(project_id).project_index(), 0, -1)
                yield [m.split("|", 1)[1] for m in members]

    async def partitions(self) -> AsyncIterator[list[str]]:
        """The projects with threads, a bounded chunk at a time (for retention passes)."""
        after = "-"
        while True:
            chunk = await self._redis.zrange(
                Keys.projects, after, "+", bylex=True, offset=0, num=tuning.PROJECTS_CHUNK
            )
            if not chunk:
                return
            yield list(chunk)
            if len(chunk) < tuning.PROJECTS_CHUNK:
                return
            after = f"({chunk[-1]}"

    async def end_thread(self, thread_id: str, target: str, reason: str) -> Ended:
        """Move an ACTIVE thread to a terminal status (and into the removal queue)."""
        keys = await self._keys_of(thread_id)
        if keys is None:
            return Ended(Outcome.NO_THREAD)
        intent = await self.installation.intend(thread_id, "")
        now = now_ms()
        reply = await self._end(keys=[keys.prefix], args=[thread_id, target, now, reason])
        if reply[0] == Outcome.OK:
            ended = Placement(reply[2], target, ENDED_SEQ, keys.project_id, now)
            await self.installation.apply(ended, intent)
        else:
            await self.installation.apply(await self.placement(thread_id), intent)
        return Ended(Outcome(reply[0]), reply[1] if len(reply) > 1 else "")

    # Retention ----------------------------------------------------------------------

    def removal_queue(self, project_id: str) -> str:
        return Keys(project_id).ended

    async def remove(self, project_id: str, thread_id: str) -> bool:
        """Remove an ended thread with all it left, in bounded steps; True when removed
        (False: it is ACTIVE, and left alone). Safe to repeat and to run concurrently."""
        keys = Keys(project_id)
        member = await self._redis.hget(keys.thread(thread_id), "member") or ""
        intent = await self.installation.intend(thread_id, member)
        while (step := await self._remove(
            keys=[keys.prefix], args=[thread_id, tuning.RETENTION_STEP]
        )) == "MORE":  # fmt: skip
            pass
        if step == "ACTIVE":
            await self.installation.apply(await self.placement(thread_id), intent)
            return False
        await self.installation.apply(Placement(member, "", FINAL), intent)
        if await self._directory.project_of(thread_id, fresh=True) == project_id:
            await self._directory.forget(thread_id)
        await self._redis.zrem(keys.ended, thread_id)
        return True

    # Messages -----------------------------------------------------------------------

    async def post(self, message: NewMessage, request: RequestKey | None) -> Posted:
        """Append to the thread's log and the recipient's inbox, atomically."""
        keys = await self._keys_of(message.thread_id)
        if keys is None:
            return Posted(Outcome.NO_THREAD)
        args = [
            request.suffix if request else "", self._request_ttl_s, message.message_id,
            message.from_agent, message.to_agent, message.payload_type, message.payload_json,
            now_ms(), message.thread_id, "1" if message.sender_is_agent else "0",
            self._max_messages, "1" if message.recipient_is_agent else "0",
        ]  # fmt: skip
        reply = await self._post(keys=[keys.prefix], args=args)
        outcome = Outcome(reply[0])
        if outcome in (Outcome.OK, Outcome.DUPLICATE):
            return Posted(outcome, await self._message_at(keys, reply[1]))
        return Posted(outcome, status=reply[1] if len(reply) > 1 else "")

    async def earlier_message(self, request: RequestKey) -> StoredMessage | None:
        """The message an earlier call with this request id posted, if any."""
        project_id = request.project_id or await self._directory.project_of(request.thread_id)
        if not project_id:
            return None
        keys = Keys(project_id)
        ref = await self._redis.get(keys.request(request))
        return await self._message_at(keys, ref) if ref else None

    async def _message_at(self, keys: Keys, ref: str) -> StoredMessage | None:
        """A message by its ref, "thread id|log entry id|message id"."""
        thread_id, entry_id, _message_id = ref.split("|")
        (found,) = await self._entries(keys, [(thread_id, entry_id)])
        return found

    async def _entries(
        self, keys: Keys, refs: Sequence[tuple[str, str]]
    ) -> list[StoredMessage | None]:
        """Messages by (thread id, log entry id), within one project."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id, entry_id in refs:
                pipe.xrange(keys.log(thread_id), entry_id, entry_id)
            replies = await pipe.execute()
        return [
            _message(reply[0][0], dict(reply[0][1]), thread_id) if reply else None
            for (thread_id, _), reply in zip(refs, replies, strict=True)
        ]

    async def thread_messages(self, thread_id: str, page: Page) -> tuple[list[StoredMessage], str]:
        """A page of a thread's messages, oldest first: (messages, next page token)."""
        keys = await self._keys_of(thread_id)
        if keys is None:
            return [], ""
        start = f"({page.cursor}" if page.cursor else "-"
        want = page.skip + page.size + 1
        entries = await self._redis.xrange(keys.log(thread_id), start, "+", count=want)
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
        keys = await self._keys_of(thread_id)
        if keys is None:
            return [], "", 0
        members, token, total = await read_lex_page(
            self._redis, keys.thread_messages_of(thread_id, agent_id), page, newest_first=False
        )
        found = await self._entries(keys, [(thread_id, _entry_member(m)) for m in members])
        return [m for m in found if m is not None], token, total

    async def agent_messages(
        self, project_id: str, agent_id: str, page: Page
    ) -> tuple[list[StoredMessage], str, int]:
        """An agent's messages across threads, newest first: (messages, token, total)."""
        keys = Keys(project_id)
        members, token, total = await read_lex_page(
            self._redis, keys.messages_of(agent_id), page, newest_first=True
        )
        refs = [(parts[1], parts[2]) for parts in (m.split("|") for m in members)]
        found = await self._entries(keys, refs)
        return [m for m in found if m is not None], token, total

    async def latest_messages(self, thread_id: str, count: int) -> list[StoredMessage]:
        keys = await self._keys_of(thread_id)
        if keys is None:
            return []
        entries = await self._redis.xrevrange(keys.log(thread_id), "+", "-", count=count + 4)
        found = [_message(e, dict(f), thread_id) for e, f in entries if f.get("kind") == "message"]
        return list(reversed(found[:count]))

    async def last_entry(self, thread_id: str) -> str:
        """Where a watcher starts: after the log's last entry."""
        keys = await self._keys_of(thread_id)
        latest = await self._redis.xrevrange(keys.log(thread_id), count=1) if keys else []
        return latest[0][0] if latest else "0-0"

    async def read_log(self, thread_id: str, after: str, block_ms: int) -> list[LogEvent]:
        keys = await self._keys_of(thread_id)
        if keys is None:
            return [LogEvent(after, None, "REMOVED")]
        reply = await self._streams.xread({keys.log(thread_id): after}, count=100, block=block_ms)
        events = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                if fields.get("kind") == "message":
                    events.append(LogEvent(entry_id, _message(entry_id, dict(fields), thread_id)))
                else:
                    events.append(LogEvent(entry_id, None, fields.get("status", "")))
        return events

    # Inbox --------------------------------------------------------------------------

    async def ensure_group(self, project_id: str, agent_id: str) -> None:
        """The inbox's consumer group, created from the start of the stream on first use
        (and again after retention dropped an empty inbox)."""
        try:
            await self._redis.xgroup_create(
                Keys(project_id).inbox(agent_id), GROUP, id="0", mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def acquire_lease(
        self, project_id: str, agent_id: str, consumer: str, token: str, ttl_ms: int
    ) -> bool:
        """Hold (or renew) the right to serve one consumer of an agent's inbox."""
        key = Keys(project_id).lease(agent_id, consumer)
        if await self._redis.set(key, token, nx=True, px=ttl_ms):
            return True
        if await self._redis.get(key) == token:
            await self._redis.pexpire(key, ttl_ms)
            return True
        return False

    async def release_lease(
        self, project_id: str, agent_id: str, consumer: str, token: str
    ) -> None:
        key = Keys(project_id).lease(agent_id, consumer)
        if await self._redis.get(key) == token:
            await self._redis.delete(key)

    async def deliveries(
        self, project_id: str, agent_id: str, consumer: str, pending: bool, block_ms: int
    ) -> list[Delivery]:
        """This consumer's unacknowledged deliveries (pending=True) or new messages."""
        inbox = Keys(project_id).inbox(agent_id)
        try:
            reply = await self._streams.xreadgroup(
                GROUP, consumer, {inbox: "0" if pending else ">"},
                count=100, block=None if pending else block_ms,
            )  # fmt: skip
        except ResponseError as exc:
            # Retention dropped the (empty) inbox, or a post made it again without its
            # group: make the group again and read on.
            if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                raise
            await self.ensure_group(project_id, agent_id)
            return []
        entries = [(e, dict(f)) for _s, got in reply or () for e, f in got if f]
        return await self._with_counts(inbox, entries)

    async def claim_idle(
        self, project_id: str, agent_id: str, consumer: str, min_idle_ms: int
    ) -> list[Delivery]:
        """Take over deliveries left unacknowledged by consumers idle for min_idle_ms."""
        inbox = Keys(project_id).inbox(agent_id)
        try:
            reply = await self._redis.xautoclaim(
                inbox, GROUP, consumer, min_idle_ms, start_id="0-0", count=100
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        return await self._with_counts(inbox, [(e, dict(f)) for e, f in reply[1] if f])

    async def give_back(self, project_id: str, agent_id: str, consumer: str, idle_ms: int) -> int:
        """A consumer whose stream ended makes its unacknowledged deliveries look idle
        for `idle_ms`, so a live consumer of the agent takes them over at its next claim
        instead of after the idle time (they stay this consumer's, first in line, if it
        comes back sooner). How many."""
        inbox = Keys(project_id).inbox(agent_id)
        try:
            rows = await self._redis.xpending_range(
                inbox, GROUP, min="-", max="+", count=1000, consumername=consumer
            )
            ids = [row["message_id"] for row in rows]
            if ids:
                await self._redis.xclaim(inbox, GROUP, consumer, 0, ids, idle=idle_ms, justid=True)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return 0
        return len(ids)

    async def _with_counts(
        self, inbox: str, entries: list[tuple[str, dict[str, str]]]
    ) -> list[Delivery]:
        if not entries:
            return []
        ids = [e for e, _ in entries]
        rows = await self._redis.xpending_range(
            inbox, GROUP, min=min(ids), max=max(ids), count=len(ids) + 100
        )
        counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        return [
            Delivery(ack_id=e, message=_message(e, f, f.get("thread_id", "")),
                     count=counts.get(e, 1))
            for e, f in entries
        ]  # fmt: skip

    async def ack(self, project_id: str, agent_id: str, ack_ids: Sequence[str]) -> int:
        """Acknowledge deliveries; an acknowledged entry leaves the inbox stream."""
        return int(await self._ack(keys=[Keys(project_id).inbox(agent_id)], args=list(ack_ids)))


_: type[ThreadStorage] = ThreadStore  # the store keeps to its interface (checked by mypy)
