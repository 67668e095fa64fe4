"""Redis storage of threads, their message logs, and every agent's inbox.

Every key lives under one hash tag, `ap:thread:{t}:`, so that posting a message — the
request-id check, the thread's log and count, the recipient's inbox, the agents'
indexes — is one atomic Lua script on a standalone Redis or a Redis Cluster alike. The
price is that the thread service's data sits in one cluster slot; see the README.

- a thread is a hash, its participants a set, its messages (and status changes) a stream;
- each agent's inbox is a stream read through a consumer group, so a message is delivered
  to one live consumer at a time and stays pending until acknowledged;
- listings read sorted sets whose members sort by creation time (ULIDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.exceptions import ResponseError

from services.common.convert import now_ms
from services.common.pagination import Page, read_lex_page
from services.common.redis import RedisClient, load_script

PREFIX = "ap:thread:{t}:"
ALL = "-"
STATUSES = ("ACTIVE", "COMPLETED", "FAILED", "KILLED")
GROUP = "inbox"
LUA = Path(__file__).with_name("lua")


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
    def request(scope: str, request_id: str) -> str:
        return f"{PREFIX}req:{scope}:{request_id}"

    @staticmethod
    def lease(agent_id: str, consumer: str) -> str:
        return f"{PREFIX}lease:{agent_id}:{consumer}"


@dataclass(frozen=True, slots=True)
class NewMessage:
    message_id: str
    thread_id: str
    from_agent: str
    to_agent: str
    payload_type: str
    payload_json: str
    sender_is_agent: bool


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

    async def create_thread(
        self, fields: dict[str, str], participants: Sequence[str], member: str
    ) -> bool:
        thread_id, project_id = fields["id"], fields["project_id"]
        keys = [
            Keys.thread(thread_id), Keys.participants(thread_id),
            Keys.project_index(project_id), Keys.project_index(project_id, "ACTIVE"),
            Keys.project_index(ALL), Keys.project_index(ALL, "ACTIVE"),
        ]  # fmt: skip
        for agent_id in participants:
            keys += [Keys.agent_index(agent_id), Keys.agent_index(agent_id, "ACTIVE")]
        flat = [item for pair in fields.items() for item in pair]
        args = [member, len(participants), *participants, *flat]
        return bool(await self._create(keys=keys, args=args))

    async def get_thread(self, thread_id: str) -> tuple[dict[str, str], list[str]] | None:
        (found,) = await self.get_threads([thread_id])
        return found

    async def get_threads(
        self, thread_ids: Sequence[str]
    ) -> list[tuple[dict[str, str], list[str]] | None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id in thread_ids:
                pipe.hgetall(Keys.thread(thread_id))
                pipe.smembers(Keys.participants(thread_id))
            replies = await pipe.execute()
        return [
            (record, sorted(parts)) if record else None
            for record, parts in zip(replies[0::2], replies[1::2], strict=True)
        ]

    async def list_threads(
        self, project_id: str, agent_id: str, status: str, page: Page
    ) -> tuple[list[tuple[dict[str, str], list[str]]], str, int]:
        key = (
            Keys.agent_index(agent_id, status)
            if agent_id
            else Keys.project_index(project_id, status)
        )
        members, token, total = await read_lex_page(self._redis, key, page, newest_first=True)
        found = await self.get_threads([m.split("|", 1)[1] for m in members])
        return [f for f in found if f is not None], token, total

    async def end_thread(self, thread_id: str, target: str, reason: str) -> tuple[str, str]:
        """Move an ACTIVE thread to a terminal status; (outcome, status before)."""
        for _ in range(5):
            found = await self.get_thread(thread_id)
            if found is None:
                return "NO_THREAD", ""
            record, participants = found
            project_id = record["project_id"]
            keys = [
                Keys.thread(thread_id), Keys.participants(thread_id), Keys.log(thread_id),
                Keys.project_index(project_id, "ACTIVE"), Keys.project_index(project_id, target),
                Keys.project_index(ALL, "ACTIVE"), Keys.project_index(ALL, target),
            ]  # fmt: skip
            for agent_id in participants:
                keys += [Keys.agent_index(agent_id, "ACTIVE"), Keys.agent_index(agent_id, target)]
            reply = await self._end(
                keys=keys, args=[target, now_ms(), record["member"], len(participants), reason]
            )
            if reply[0] != "RETRY":
                return reply[0], (reply[1] if len(reply) > 1 else "")
        return "RETRY", ""

    # Messages -----------------------------------------------------------------------

    async def post(
        self, message: NewMessage, member: str, request_key: str | None
    ) -> tuple[str, str]:
        """(outcome, ref "thread|entry|message id" or the thread's status)."""
        sender = message.from_agent
        keys = [
            Keys.thread(message.thread_id), Keys.participants(message.thread_id),
            Keys.log(message.thread_id), request_key or Keys.request("none", "-"),
            Keys.inbox(message.to_agent), Keys.messages_of(message.to_agent),
            Keys.messages_of(sender),
            Keys.agent_index(message.to_agent), Keys.agent_index(message.to_agent, "ACTIVE"),
            Keys.agent_index(sender), Keys.agent_index(sender, "ACTIVE"),
            Keys.thread_messages_of(message.thread_id, message.to_agent),
            Keys.thread_messages_of(message.thread_id, sender),
        ]  # fmt: skip
        args = [
            "1" if request_key else "0", self._request_ttl_s, message.message_id, sender,
            message.to_agent, message.payload_type, message.payload_json, now_ms(),
            message.thread_id, member, "1" if message.sender_is_agent else "0",
        ]  # fmt: skip
        reply = await self._post(keys=keys, args=args)
        return reply[0], (reply[1] if len(reply) > 1 else "")

    async def request_ref(self, request_key: str) -> str | None:
        return await self._redis.get(request_key)

    async def entries(self, refs: Sequence[tuple[str, str]]) -> list[dict[str, str] | None]:
        """Log entries by (thread id, entry id)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for thread_id, entry_id in refs:
                pipe.xrange(Keys.log(thread_id), entry_id, entry_id)
            replies = await pipe.execute()
        return [dict(reply[0][1]) if reply else None for reply in replies]

    async def thread_messages(
        self, thread_id: str, after_entry: str | None, skip: int, size: int
    ) -> tuple[list[tuple[str, dict[str, str]]], bool]:
        """Messages of a thread, oldest first, after a log entry; (page, more follow)."""
        start = f"({after_entry}" if after_entry else "-"
        entries = await self._redis.xrange(Keys.log(thread_id), start, "+", count=skip + size + 1)
        messages = [(e, dict(f)) for e, f in entries if f.get("kind") == "message"][skip:]
        more = len(messages) > size or len(entries) == skip + size + 1
        return messages[:size], more

    async def thread_agent_messages(
        self, thread_id: str, agent_id: str, page: Page
    ) -> tuple[list[tuple[str, str]], str, int]:
        """(thread id, entry id) of the messages from or to one agent in one thread, oldest
        first: an exact page and total from the thread's per-agent index."""
        members, token, total = await read_lex_page(
            self._redis, Keys.thread_messages_of(thread_id, agent_id), page, newest_first=False
        )
        refs = []
        for member in members:
            ms, _, seq = member.partition("-")
            refs.append((thread_id, f"{int(ms)}-{int(seq)}"))
        return refs, token, total

    async def latest_messages(self, thread_id: str, count: int) -> list[dict[str, str]]:
        entries = await self._redis.xrevrange(Keys.log(thread_id), "+", "-", count=count + 4)
        messages = [dict(f) for _, f in entries if f.get("kind") == "message"][:count]
        return list(reversed(messages))

    async def agent_messages(
        self, agent_id: str, page: Page
    ) -> tuple[list[tuple[str, str]], str, int]:
        """(thread id, entry id) of an agent's messages, newest first."""
        members, token, total = await read_lex_page(
            self._redis, Keys.messages_of(agent_id), page, newest_first=True
        )
        refs = [tuple(m.split("|")[1:3]) for m in members]
        return refs, token, total  # type: ignore[return-value]

    async def last_entry(self, thread_id: str) -> str:
        latest = await self._redis.xrevrange(Keys.log(thread_id), count=1)
        return latest[0][0] if latest else "0-0"

    async def read_log(
        self, thread_id: str, after: str, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        reply = await self._streams.xread({Keys.log(thread_id): after}, count=100, block=block_ms)
        return [(e, dict(f)) for _s, entries in reply for e, f in entries] if reply else []

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

    async def read_inbox(
        self, agent_id: str, consumer: str, pending: bool, block_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        """This consumer's unacknowledged deliveries (pending=True) or new messages."""
        reply = await self._streams.xreadgroup(
            GROUP, consumer, {Keys.inbox(agent_id): "0" if pending else ">"},
            count=100, block=None if pending else block_ms,
        )  # fmt: skip
        return [(e, dict(f)) for _s, entries in reply for e, f in entries if f] if reply else []

    async def claim_idle(
        self, agent_id: str, consumer: str, min_idle_ms: int
    ) -> list[tuple[str, dict[str, str]]]:
        """Take over deliveries left unacknowledged by consumers idle for min_idle_ms."""
        reply = await self._redis.xautoclaim(
            Keys.inbox(agent_id), GROUP, consumer, min_idle_ms, start_id="0-0", count=100
        )
        return [(e, dict(f)) for e, f in reply[1] if f]

    async def delivery_counts(self, agent_id: str, entry_ids: Sequence[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        rows = await self._redis.xpending_range(
            Keys.inbox(agent_id),
            GROUP,
            min=min(entry_ids),
            max=max(entry_ids),
            count=len(entry_ids) + 100,
        )
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    async def ack(self, agent_id: str, ack_ids: Sequence[str]) -> int:
        return int(await self._redis.xack(Keys.inbox(agent_id), GROUP, *ack_ids))
