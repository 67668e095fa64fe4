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

from pathlib import Path
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.resp import PipelinedRedis
from services.common.settings import Settings

# Responses are decoded to str (decode_responses=True), which redis-py's bytes|str union
# types cannot express; the stores treat the client as untyped at that boundary.
RedisClient: TypeAlias = Any


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
        return RedisCluster.from_url(settings.redis_url, **options)
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
    return Redis(connection_pool=pool)


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
