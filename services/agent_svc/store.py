"""Redis storage of projects, agent types and agents.

Projects, agent types and API keys — few, and written at human rates — live under one
hash tag, `ap:agent:{a}:`. Agents live with their project, under the project's hash tag
`ap:agent:{p:<project>}:` (`services/common/partitions.py`), so each agent write — the
record with its status indexes, name index, the project's counters and status event — is
one atomic Lua script in one slot, and on Redis Cluster the projects spread over the
masters. An agent's project is found from its directory key. Cross-project views read
installation-wide indexes kept beside the projects' (`services/common/installation.py`):
a `-` listing page, the agent counts and a retention pass cost the same at 10 or 10,000
projects; the all-projects event stream gets each event just after its project's.

A terminated agent waits in its project's removal queue for AGENT_RETENTION, then
`remove_agent` deletes it and the counters forget it (SPEC §10).

Indexes are sorted sets with score 0 whose members sort by creation time (ULIDs), read
a page at a time (`read_lex_page`); counters are kept as writes happen, so no read
scans.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common import tuning
from services.common.convert import new_id, now_ms
from services.common.installation import FINAL, Installation, Placement
from services.common.pagination import Page, read_lex_page
from services.common.partitions import Directory, project_prefix
from services.common.redis import RedisClient, load_script

SERVICE = "agent"
PREFIX = "ap:agent:{a}:"
STATUSES = ("IDLE", "WORKING", "WAITING", "PAUSED", "TERMINATED")
ALL = "-"
LUA = Path(__file__).with_name("lua")


class Keys:
    """Key names, as every service describes them: the installation's own under one tag
    (class attributes and static methods), a project's under the project's tag
    (`Keys(project_id)`, whose `prefix` the Lua scripts get)."""

    counters = PREFIX + "counters"
    projects = PREFIX + "projects"
    types = PREFIX + "types"
    active_types = PREFIX + "types:active"
    api_keys = PREFIX + "keys"
    all_events = PREFIX + "events:-"  # every project's status events
    everywhere = PREFIX + "all:"  # installation-wide indexes (services/common/installation.py)

    @staticmethod
    def project(project_id: str) -> str:
        return f"{PREFIX}project:{project_id}"

    @staticmethod
    def owner_projects(owner: str) -> str:
        return f"{PREFIX}owner:{owner}:projects"

    @staticmethod
    def api_key(key_id: str) -> str:
        return f"{PREFIX}key:{key_id}"

    @staticmethod
    def keys_of(principal: str) -> str:
        return f"{PREFIX}keys-of:{principal}"

    @staticmethod
    def agent_type(type_id: str) -> str:
        return f"{PREFIX}type:{type_id}"

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        # The prefix of a project's agents, their indexes, counters, events and queue.
        self.prefix = project_prefix(SERVICE, project_id)

    def agent(self, agent_id: str) -> str:
        return f"{self.prefix}agent:{agent_id}"

    def index(self, status: str = "") -> str:
        return f"{self.prefix}idx:{status or 'ALL'}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def terminated(self) -> str:
        """The removal queue: terminated agents scored by their termination time."""
        return f"{self.prefix}terminated"


@dataclass(frozen=True, slots=True)
class AgentChange:
    """One atomic change of an agent (see update_agent.lua)."""

    agent_id: str
    project_check: str = ""
    target_status: str = ""
    allowed_from: Sequence[str] = ()
    new_name: str = ""
    tasks_completed: int = 0
    delete_fields: Sequence[str] = ()
    set_fields: dict[str, str] | None = None


Record = dict[str, str]  # a stored record's fields; records.py turns them into messages


def _ms(value: str | None) -> int | None:
    return int(value) if value else None


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    id: str
    display_name: str
    owner: str
    create_ms: int | None
    agents_total: int  # agents ever spawned in it
    agents_by_status: dict[str, int]  # live counts per status
    tasks_completed: int

    @classmethod
    def of(cls, f: Record) -> ProjectRecord:
        return cls(
            id=f["id"], display_name=f.get("display_name", ""), owner=f.get("owner", ""),
            create_ms=_ms(f.get("create_ms")), agents_total=int(f.get("n_total", 0)),
            agents_by_status={s: int(f.get(f"n_{s}", 0)) for s in STATUSES},
            tasks_completed=int(f.get("tasks_completed", 0)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TypeRecord:
    id: str
    display_name: str
    description: str
    default_model: str
    is_active: bool
    input_schema: str
    example: str
    create_ms: int | None

    @classmethod
    def of(cls, f: Record) -> TypeRecord:
        return cls(
            id=f["id"], display_name=f.get("display_name", ""),
            description=f.get("description", ""), default_model=f.get("default_model", ""),
            is_active=f.get("is_active") == "1", input_schema=f.get("input_schema", ""),
            example=f.get("example", ""), create_ms=_ms(f.get("create_ms")),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AgentRecord:
    id: str
    project_id: str
    agent_type_id: str
    name: str
    description: str
    status: str  # IDLE, WORKING, WAITING, PAUSED, TERMINATED
    current_task: str
    long_term_memory_ref: str
    session_id: str
    peers: tuple[str, ...]
    short_term_memory_json: str
    last_activity_ms: int | None
    terminate_ms: int | None
    create_ms: int | None
    update_ms: int | None
    tasks_completed: int

    @classmethod
    def of(cls, f: Record) -> AgentRecord:
        return cls(
            id=f["id"], project_id=f.get("project_id", ""),
            agent_type_id=f.get("agent_type_id", ""), name=f.get("name", ""),
            description=f.get("description", ""), status=f["status"],
            current_task=f.get("current_task", ""),
            long_term_memory_ref=f.get("long_term_memory_ref", ""),
            session_id=f.get("session_id", ""), peers=tuple(json.loads(f.get("peers") or "[]")),
            short_term_memory_json=f.get("short_term_memory", ""),
            last_activity_ms=_ms(f.get("last_activity_ms")),
            terminate_ms=_ms(f.get("terminate_ms")), create_ms=_ms(f.get("create_ms")),
            update_ms=_ms(f.get("update_ms")), tasks_completed=int(f.get("tasks_completed", 0)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    role: str  # SUPERUSER, OWNER, AGENT
    subject: str
    project_id: str
    created_by: str
    create_ms: int | None
    revoked: bool
    token_hash: str

    @classmethod
    def of(cls, f: Record) -> KeyRecord:
        return cls(
            key_id=f["key_id"], role=f["role"], subject=f.get("subject", ""),
            project_id=f.get("project_id", ""), created_by=f.get("created_by", ""),
            create_ms=_ms(f.get("create_ms")), revoked=f.get("revoked") == "1",
            token_hash=f.get("hash", ""),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """A change of an agent's status, from a project's event stream."""

    entry_id: str
    agent_id: str
    previous_status: str  # "" when the agent was just spawned
    ms: int


class Outcome(enum.StrEnum):
    """What a write script answered (the same words as the Lua scripts return)."""

    OK = "OK"
    DUPLICATE = "DUPLICATE"  # a spawn retried with its request id: the first agent
    NO_PROJECT = "NO_PROJECT"
    NAME_TAKEN = "NAME_TAKEN"
    NOT_FOUND = "NOT_FOUND"
    BAD_STATE = "BAD_STATE"  # the status move is not allowed from the current state


@dataclass(frozen=True, slots=True)
class Change:
    outcome: Outcome
    detail: str = ""


class AgentStorage(Protocol):
    """What the agent service needs from its storage."""

    async def create_project(self, fields: Record) -> bool: ...
    async def get_project(self, project_id: str) -> ProjectRecord | None: ...
    async def list_projects(
        self, page: Page, owner: str | None = None
    ) -> tuple[list[ProjectRecord], str, int]: ...
    async def create_type(self, fields: Record) -> bool: ...
    async def get_type(self, type_id: str) -> TypeRecord | None: ...
    async def update_type(self, type_id: str, fields: Record) -> None: ...
    async def list_types(
        self, page: Page, active_only: bool = False
    ) -> tuple[list[TypeRecord], str, int]: ...
    async def display_names(
        self, type_ids: Iterable[str], project_ids: Iterable[str]
    ) -> tuple[dict[str, str], dict[str, str]]: ...
    async def spawn(self, fields: Record, request_id: str) -> Change: ...
    async def update(self, change: AgentChange, project_id: str) -> Change: ...
    async def get_agent(self, agent_id: str) -> AgentRecord | None: ...
    async def get_agents(self, agent_ids: Sequence[str]) -> list[AgentRecord]: ...
    async def list_agents(
        self, project_id: str, status: str, page: Page
    ) -> tuple[list[AgentRecord], str, int]: ...
    async def counters(self) -> dict[str, int]: ...
    async def project_of(self, agent_id: str) -> str | None: ...
    async def create_key(self, fields: Record, visible_to: Sequence[str]) -> None: ...
    async def get_key(self, key_id: str) -> KeyRecord | None: ...
    async def list_keys(
        self, page: Page, visible_to: str | None
    ) -> tuple[list[KeyRecord], str, int]: ...
    async def revoke_key(self, key_id: str) -> None: ...
    async def last_event_id(self, project_id: str) -> str: ...
    async def read_events(self, project_id: str, after: str, block_ms: int) -> list[AgentEvent]: ...


class AgentStore:
    def __init__(
        self, redis: RedisClient, request_ttl_s: int, streams: RedisClient | None = None
    ) -> None:
        self._redis = redis
        self._streams = streams or redis  # blocking reads of server streams
        self._request_ttl_s = request_ttl_s
        self._create_record = load_script(redis, LUA / "create_record.lua")
        self._spawn = load_script(redis, LUA / "spawn_agent.lua")
        self._update = load_script(redis, LUA / "update_agent.lua")
        self._remove = load_script(redis, LUA / "remove_agent.lua")
        self._directory = Directory(redis, SERVICE)
        self.installation = Installation(redis, Keys.everywhere, STATUSES)

    # Projects and agent types -------------------------------------------------------

    async def create_project(self, fields: Record) -> bool:
        """False when a project with that id exists."""
        index_member = f"{new_id()}|{fields['id']}"  # sorts by creation time
        keys = [
            Keys.project(fields["id"]), Keys.projects, Keys.counters,
            Keys.owner_projects(fields["owner"]),
        ]  # fmt: skip
        return bool(
            await self._create_record(keys=keys, args=[index_member, "projects", *_flat(fields)])
        )

    async def get_project(self, project_id: str) -> ProjectRecord | None:
        (found,) = await self._projects([project_id])
        return found

    async def _projects(self, project_ids: Sequence[str]) -> list[ProjectRecord | None]:
        """Projects: each one's record (global) with its counters (in its own slot)."""
        found = await self._hashes(
            key for p in project_ids for key in (Keys.project(p), Keys(p).stats)
        )
        return [
            ProjectRecord.of({**record, **stats}) if record else None
            for record, stats in zip(found[0::2], found[1::2], strict=True)
        ]

    async def list_projects(
        self, page: Page, owner: str | None = None
    ) -> tuple[list[ProjectRecord], str, int]:
        index = Keys.projects if owner is None else Keys.owner_projects(owner)
        members, token, total = await read_lex_page(self._redis, index, page, newest_first=True)
        projects = await self._projects([m.split("|", 1)[1] for m in members])
        return [p for p in projects if p], token, total

    async def partitions(self) -> AsyncIterator[list[str]]:
        """Every project's id, a bounded chunk at a time (for retention passes)."""
        start = 0
        while chunk := await self._redis.zrange(
            Keys.projects, start, start + tuning.PROJECTS_CHUNK - 1
        ):
            yield [m.split("|", 1)[1] for m in chunk]
            start += len(chunk)

    async def every_agent(self) -> AsyncIterator[list[str]]:
        """Every agent's id, a project at a time (to index an upgraded installation)."""
        async for chunk in self.partitions():
            for project_id in chunk:
                yield list(await self._redis.zrange(Keys(project_id).index(), 0, -1))

    async def create_type(self, fields: dict[str, str]) -> bool:
        keys = [Keys.agent_type(fields["id"]), Keys.types, Keys.counters]
        if fields.get("is_active") == "1":
            keys.append(Keys.active_types)
        return bool(
            await self._create_record(keys=keys, args=[fields["id"], "agent_types", *_flat(fields)])
        )

    async def get_type(self, type_id: str) -> TypeRecord | None:
        found = await self._hash(Keys.agent_type(type_id))
        return TypeRecord.of(found) if found else None

    async def update_type(self, type_id: str, fields: dict[str, str]) -> None:
        """Types are never deleted, so an existence check then HSET cannot resurrect one.
        The record and the index of active types change together (MULTI, one slot)."""
        if not fields:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(Keys.agent_type(type_id), mapping=fields)
            if fields.get("is_active") == "1":
                pipe.zadd(Keys.active_types, {type_id: 0})
            elif fields.get("is_active") == "0":
                pipe.zrem(Keys.active_types, type_id)
            await pipe.execute()

    async def list_types(
        self, page: Page, active_only: bool = False
    ) -> tuple[list[TypeRecord], str, int]:
        index = Keys.active_types if active_only else Keys.types
        members, token, total = await read_lex_page(self._redis, index, page, newest_first=False)
        types = await self._hashes(Keys.agent_type(m) for m in members)
        return [TypeRecord.of(t) for t in types if t], token, total

    async def display_names(
        self, type_ids: Iterable[str], project_ids: Iterable[str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Display names of types and projects, for the agents' denormalised fields."""
        type_ids, project_ids = sorted(set(type_ids)), sorted(set(project_ids))
        async with self._redis.pipeline(transaction=False) as pipe:
            for type_id in type_ids:
                pipe.hget(Keys.agent_type(type_id), "display_name")
            for project_id in project_ids:
                pipe.hget(Keys.project(project_id), "display_name")
            names = await pipe.execute()
        return (
            dict(zip(type_ids, (n or "" for n in names[: len(type_ids)]), strict=True)),
            dict(zip(project_ids, (n or "" for n in names[len(type_ids) :]), strict=True)),
        )

    # Agents -------------------------------------------------------------------------

    async def spawn(self, fields: Record, request_id: str) -> Change:
        """OK or DUPLICATE (detail: the agent's id), NO_PROJECT, or NAME_TAKEN (detail: the
        name's holder)."""
        project_id, agent_id = fields["project_id"], fields["id"]
        if not await self._redis.exists(Keys.project(project_id)):  # projects are never deleted
            return Change(Outcome.NO_PROJECT)
        await self._directory.place(agent_id, project_id)
        args = [agent_id, fields["name"], request_id, self._request_ttl_s,
                tuning.AGENT_EVENTS_MAXLEN, *_flat(fields)]  # fmt: skip
        intent = await self.installation.intend(agent_id, agent_id)
        result = await self._spawn(keys=[Keys(project_id).prefix], args=args)
        if result[0] != Outcome.OK or result[1] != agent_id:
            await self._directory.forget(agent_id)  # this id was not used
            await self.installation.apply(await self.placement(agent_id), intent)
        else:
            await self.installation.apply(Placement(agent_id, "IDLE", 0), intent)
            if int(result[2]):
                await self._all_events(agent_id, "", "IDLE")
        return Change(Outcome(result[0]), result[1] if len(result) > 1 else "")

    async def update(self, change: AgentChange, project_id: str) -> Change:
        """Apply a change: OK or BAD_STATE (detail: the state it was in), NOT_FOUND, or
        NAME_TAKEN (detail: the holder). `project_id` is the agent's own."""
        allowed, now = "," + ",".join(change.allowed_from) + ",", now_ms()
        args = [
            change.agent_id, change.project_check, change.target_status, allowed,
            change.new_name, change.tasks_completed, now, tuning.AGENT_EVENTS_MAXLEN,
            len(change.delete_fields), *change.delete_fields, *_flat(change.set_fields or {}),
        ]  # fmt: skip
        if not change.target_status:
            result = await self._update(keys=[Keys(project_id).prefix], args=args)
            return Change(Outcome(result[0]), result[1] if len(result) > 1 else "")
        intent = await self.installation.intend(change.agent_id, change.agent_id)
        result = await self._update(keys=[Keys(project_id).prefix], args=args)
        if result[0] != Outcome.OK:
            await self.installation.apply(await self.placement(change.agent_id), intent)
            return Change(Outcome(result[0]), result[1] if len(result) > 1 else "")
        terminated = change.target_status == "TERMINATED"
        await self.installation.apply(
            Placement(change.agent_id, change.target_status, int(result[2]),
                      project_id if terminated else "", now if terminated else 0),
            intent,
        )  # fmt: skip
        await self._all_events(change.agent_id, result[1], change.target_status)
        return Change(Outcome.OK, result[1])

    async def placement(self, agent_id: str) -> Placement:
        """Where the agent stands now, as its project's record says (for the global
        indexes: `Installation.heal`)."""
        project_id = await self._directory.project_of(agent_id, fresh=True)
        if project_id is not None:
            status, seq = await self._redis.hmget(Keys(project_id).agent(agent_id), "status", "seq")
            if status == "TERMINATED":
                ended = await self._redis.zscore(Keys(project_id).terminated, agent_id)
                return Placement(agent_id, status, int(seq or 0), project_id, int(ended or 0))
            if status:
                return Placement(agent_id, status, int(seq or 0))
        return Placement(agent_id, "", FINAL)

    async def _all_events(self, agent_id: str, previous: str, status: str) -> None:
        """The all-projects event stream, written just after the project's own."""
        await self._redis.xadd(
            Keys.all_events, {"agent_id": agent_id, "from": previous, "to": status},
            maxlen=tuning.AGENT_EVENTS_MAXLEN, approximate=True,
        )  # fmt: skip

    async def project_of(self, agent_id: str) -> str | None:
        return await self._directory.project_of(agent_id)

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        found = await self.get_agents([agent_id])
        return found[0] if found else None

    async def get_agents(self, agent_ids: Sequence[str]) -> list[AgentRecord]:
        """The agents that exist, in the order asked, wherever their projects are."""
        projects = await self._directory.projects_of(agent_ids)
        return await self._agents_in(
            [(p, a) for p, a in zip(projects, agent_ids, strict=True) if p is not None]
        )

    async def _agents_in(self, placed: Sequence[tuple[str, str]]) -> list[AgentRecord]:
        found = await self._hashes(Keys(p).agent(a) for p, a in placed)
        return [AgentRecord.of(a) for a in found if a]

    async def list_agents(
        self, project_id: str, status: str, page: Page
    ) -> tuple[list[AgentRecord], str, int]:
        if project_id != ALL:
            members, token, total = await read_lex_page(
                self._redis, Keys(project_id).index(status), page, newest_first=True
            )
            return await self._agents_in([(project_id, m) for m in members]), token, total
        members, token, total = await self.installation.page(status, page)
        return await self.get_agents(members), token, total

    async def counters(self) -> dict[str, int]:
        """Installation counters: projects and types, and agents by status (from the
        installation-wide indexes: O(statuses), whatever the number of projects)."""
        totals = {k: int(v) for k, v in (await self._redis.hgetall(Keys.counters)).items()}
        for status, count in (await self.installation.counts()).items():
            totals[f"n_{status}" if status else "agents"] = count
        return totals

    # Retention ----------------------------------------------------------------------

    def removal_queue(self, project_id: str) -> str:
        return Keys(project_id).terminated

    async def remove(self, project_id: str, agent_id: str) -> bool:
        """Remove a terminated agent (False: it is not terminated, and left alone)."""
        intent = await self.installation.intend(agent_id, agent_id)
        if await self._remove(keys=[Keys(project_id).prefix], args=[agent_id]) == "ACTIVE":
            await self.installation.apply(await self.placement(agent_id), intent)
            return False
        await self.installation.apply(Placement(agent_id, "", FINAL), intent)
        if await self._directory.project_of(agent_id, fresh=True) == project_id:
            await self._directory.forget(agent_id)
        await self._redis.zrem(Keys(project_id).terminated, agent_id)
        return True

    # API keys -----------------------------------------------------------------------

    async def create_key(self, fields: dict[str, str], visible_to: Sequence[str]) -> None:
        keys = [Keys.api_key(fields["key_id"]), Keys.api_keys, Keys.counters]
        keys += [Keys.keys_of(p) for p in sorted(set(visible_to))]
        await self._create_record(keys=keys, args=[fields["key_id"], "api_keys", *_flat(fields)])

    async def get_key(self, key_id: str) -> KeyRecord | None:
        found = await self._hash(Keys.api_key(key_id))
        return KeyRecord.of(found) if found else None

    async def list_keys(
        self, page: Page, visible_to: str | None
    ) -> tuple[list[KeyRecord], str, int]:
        index = Keys.api_keys if visible_to is None else Keys.keys_of(visible_to)
        members, token, total = await read_lex_page(self._redis, index, page, newest_first=True)
        found = await self._hashes(Keys.api_key(m) for m in members)
        return [KeyRecord.of(k) for k in found if k], token, total

    async def revoke_key(self, key_id: str) -> None:
        await self._redis.hset(Keys.api_key(key_id), "revoked", "1")

    # Status events ------------------------------------------------------------------

    async def last_event_id(self, project_id: str) -> str:
        latest = await self._redis.xrevrange(_events(project_id), count=1)
        return latest[0][0] if latest else "0-0"

    async def read_events(self, project_id: str, after: str, block_ms: int) -> list[AgentEvent]:
        reply = await self._streams.xread({_events(project_id): after}, count=100, block=block_ms)
        return [
            AgentEvent(entry_id, fields["agent_id"], fields.get("from", ""),
                       int(entry_id.split("-")[0]))
            for _stream, entries in reply or ()
            for entry_id, fields in entries
        ]  # fmt: skip

    # Helpers ------------------------------------------------------------------------

    async def _hash(self, key: str) -> dict[str, str] | None:
        return await self._redis.hgetall(key) or None

    async def _hashes(self, keys: Iterable[str]) -> list[dict[str, str]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return list(await pipe.execute())


def _events(project_id: str) -> str:
    """A project's status events, or every project's ("-")."""
    return Keys.all_events if project_id == ALL else Keys(project_id).events


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


_: type[AgentStorage] = AgentStore  # the store keeps to its interface (checked by mypy)
