"""Redis clients and Lua scripts.

One asyncio client per process, standalone or Redis Cluster (REDIS_CLUSTER=true), with the
hiredis parser (installed through redis[hiredis]), explicit timeouts so calls fail fast
while Redis is down, and one retry on a broken connection so a restarted Redis is
invisible. Scripts are redis-py `Script` objects: EVALSHA, and on NOSCRIPT (after a
restart, failover or SCRIPT FLUSH) the script is loaded again and the call repeated.

The hot path's idempotent scripts (`HotScript`) go over one pipelined connection instead
(services/common/resp.py) when Redis is a standalone `redis://` server: a quarter of
redis-py's CPU per call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Protocol, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.resp import PipelinedRedis
from services.common.settings import Settings

Value = str | int | float
StreamEntries = list[tuple[str, dict[str, str]]]


class RedisPipeline(Protocol):
    """The commands the stores queue in a pipeline (each answers in `execute`)."""

    async def __aenter__(self) -> RedisPipeline: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def execute(self) -> list[Any]: ...
    def execute_command(self, *args: Value) -> RedisPipeline: ...
    def get(self, name: str) -> RedisPipeline: ...
    def hget(self, name: str, key: str) -> RedisPipeline: ...
    def hgetall(self, name: str) -> RedisPipeline: ...
    def hmget(self, name: str, keys: Sequence[str], *args: str) -> RedisPipeline: ...
    def hset(
        self, name: str, key: str | None = None, value: Value | None = None,
        mapping: Mapping[str, Value] | None = None,
    ) -> RedisPipeline: ...  # fmt: skip
    def zadd(self, name: str, mapping: Mapping[str, Value]) -> RedisPipeline: ...
    def zrem(self, name: str, *values: str) -> RedisPipeline: ...
    def smembers(self, name: str) -> RedisPipeline: ...
    def zcard(self, name: str) -> RedisPipeline: ...
    def zscore(self, name: str, value: str) -> RedisPipeline: ...
    def zrange(
        self, name: str, start: int, end: int, withscores: bool = False
    ) -> RedisPipeline: ...
    def zrevrange(
        self, name: str, start: int, end: int, withscores: bool = False
    ) -> RedisPipeline: ...
    def zrangebyscore(
        self, name: str, min: Value, max: Value, start: int | None = None, num: int | None = None
    ) -> RedisPipeline: ...
    def lrange(self, name: str, start: int, end: int) -> RedisPipeline: ...
    def llen(self, name: str) -> RedisPipeline: ...
    def xrevrange(
        self, name: str, max: str = "+", min: str = "-", count: int | None = None
    ) -> RedisPipeline: ...
    def xlen(self, name: str) -> RedisPipeline: ...
    def xrange(
        self, name: str, min: str = "-", max: str = "+", count: int | None = None
    ) -> RedisPipeline: ...


class RedisClient(Protocol):
    """The Redis commands the stores use, as this project calls them: with
    decode_responses=True every reply is `str`, which redis-py's own `bytes | str` unions
    cannot say. `create_redis` returns a redis-py client (standalone or Cluster) as this
    type, so every store call is checked against it."""

    async def aclose(self) -> None: ...
    async def ping(self) -> bool: ...
    def pipeline(self, transaction: bool = True) -> RedisPipeline: ...
    def register_script(self, script: str) -> Any: ...
    async def script_load(self, script: str) -> str: ...
    async def info(self, section: str | None = None) -> dict[str, Any]: ...
    def scan_iter(
        self, match: str | None = None, count: int | None = None
    ) -> AsyncIterator[str]: ...
    async def execute_command(self, *args: Value) -> Any: ...
    # Strings and keys
    async def get(self, name: str) -> str | None: ...
    async def set(
        self, name: str, value: Value, ex: int | None = None, px: int | None = None,
        nx: bool = False,
    ) -> bool | None: ...  # fmt: skip
    async def delete(self, *names: str) -> int: ...
    async def unlink(self, *names: str) -> int: ...
    async def exists(self, *names: str) -> int: ...
    async def pexpire(self, name: str, time: int) -> bool: ...
    # Hashes
    async def hget(self, name: str, key: str) -> str | None: ...
    async def hgetall(self, name: str) -> dict[str, str]: ...
    async def hmget(self, name: str, keys: Sequence[str], *args: str) -> list[str | None]: ...
    async def hset(
        self, name: str, key: str | None = None, value: Value | None = None,
        mapping: Mapping[str, Value] | None = None,
    ) -> int: ...  # fmt: skip
    async def hdel(self, name: str, *keys: str) -> int: ...
    async def hkeys(self, name: str) -> list[str]: ...
    async def hexists(self, name: str, key: str) -> bool: ...
    # Sets and sorted sets
    async def smembers(self, name: str) -> AbstractSet[str]: ...
    async def zadd(self, name: str, mapping: Mapping[str, Value]) -> int: ...
    async def zrem(self, name: str, *values: str) -> int: ...
    async def zcard(self, name: str) -> int: ...
    async def zscore(self, name: str, value: str) -> float | None: ...
    async def zrange(
        self, name: str, start: Value, end: Value, desc: bool = False,
        withscores: bool = False, byscore: bool = False, bylex: bool = False,
        offset: int | None = None, num: int | None = None,
    ) -> list[Any]: ...  # fmt: skip
    async def zrevrange(
        self, name: str, start: int, end: int, withscores: bool = False
    ) -> list[Any]: ...
    # Streams
    async def xadd(
        self, name: str, fields: Mapping[str, Value], id: str = "*",
        maxlen: int | None = None, approximate: bool = True,
    ) -> str: ...  # fmt: skip
    async def xrange(
        self, name: str, min: str = "-", max: str = "+", count: int | None = None
    ) -> StreamEntries: ...
    async def xrevrange(
        self, name: str, max: str = "+", min: str = "-", count: int | None = None
    ) -> StreamEntries: ...
    async def xread(
        self, streams: Mapping[str, str], count: int | None = None, block: int | None = None
    ) -> list[tuple[str, StreamEntries]] | None: ...
    async def xreadgroup(
        self, groupname: str, consumername: str, streams: Mapping[str, str],
        count: int | None = None, block: int | None = None,
    ) -> list[tuple[str, StreamEntries]] | None: ...  # fmt: skip
    async def xgroup_create(
        self, name: str, groupname: str, id: str = "$", mkstream: bool = False
    ) -> bool: ...
    async def xautoclaim(
        self, name: str, groupname: str, consumername: str, min_idle_time: int,
        start_id: str = "0-0", count: int | None = None,
    ) -> list[Any]: ...  # fmt: skip
    async def xclaim(
        self, name: str, groupname: str, consumername: str, min_idle_time: int,
        message_ids: Sequence[str], idle: int | None = None, justid: bool = False,
    ) -> list[Any]: ...  # fmt: skip
    async def xpending_range(
        self, name: str, groupname: str, min: str, max: str, count: int,
        consumername: str | None = None,
    ) -> list[dict[str, Any]]: ...  # fmt: skip


def create_redis(settings: Settings, *, blocking_reads: bool = False) -> RedisClient:
    """A Redis client from REDIS_URL and REDIS_CLUSTER.

    `blocking_reads=True` builds the separate client that server streams use for
    XREAD/XREADGROUP BLOCK: each open stream holds one of its connections while it waits,
    so those waits can never starve the ordinary commands of their pool.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": min(1.0, settings.redis_timeout_s),
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1),
        "retry_on_error": [RedisConnectionError],
        "health_check_interval": 15,
    }
    if settings.redis_cluster:
        return cast(RedisClient, RedisCluster.from_url(settings.redis_url, **options))
    # A bounded pool: a burst of calls waits briefly for a connection instead of opening
    # hundreds at once (which, on a busy host, is what makes connects time out).
    if blocking_reads:
        # A blocked XREAD waits up to ~1 s; its socket timeout must outlast that.
        options["socket_timeout"] = max(settings.redis_timeout_s, 5.0)
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_stream_connections
        if blocking_reads
        else settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        **options,
    )
    return cast(RedisClient, Redis(connection_pool=pool))


def typed(client: Redis | RedisCluster) -> RedisClient:
    """A redis-py client made elsewhere (bench, tools), decoding replies to str, as the
    stores' type."""
    return cast(RedisClient, client)


def load_script(redis: RedisClient, path: Path, prelude: Path | None = None) -> Any:
    """A callable script: `await script(keys=[...], args=[...])`. A prelude (shared Lua
    functions) is prepended, since Redis scripts cannot import one another."""
    source = (prelude.read_text() + "\n" if prelude else "") + path.read_text()
    return redis.register_script(source)


def create_pipelined(settings: Settings) -> PipelinedRedis | None:
    """The pipelined connection for hot scripts; None where only redis-py serves (Cluster,
    TLS, unix sockets). It connects on first use."""
    if settings.redis_cluster or not PipelinedRedis.supports(settings.redis_url):
        return None
    return PipelinedRedis(settings.redis_url, settings.redis_timeout_s)


class HotScript:
    """A script on the hot path: `await script(keys=[...], args=[...])`, over the pipelined
    connection when there is one, else redis-py. A call whose connection broke before its
    answer is sent again (as redis-py's one retry does): for scripts where that is safe."""

    def __init__(self, script: Any, pipe: PipelinedRedis | None) -> None:
        self._script = script
        self._pipe = pipe

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        if self._pipe is None:
            return await self._script(keys=keys, args=args)
        return await self._pipe.evalsha(self._script.sha, self._script.script, keys, args)
