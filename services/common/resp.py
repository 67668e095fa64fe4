"""A pipelined RESP connection for the hot path's script calls.

redis-py spends more of the usage service's CPU on one EVALSHA than Redis spends running
it: a connection taken from and given back to a pool under a lock, retry and timeout
wrappers, command packing in Python (docs/performance.md has the measurements). Here one
TCP connection carries every call: each command is packed by hiredis and written at once,
replies are parsed by hiredis as they arrive and handed to the waiting calls in order.
Many calls share the connection at the same time, so it needs no pool.

Promises kept from the redis-py path (services/common/redis.py): a call waits at most
REDIS_TIMEOUT_SECONDS (and a quarter more: one watchdog timer per connection checks the
oldest call, instead of a timer per call), then fails with redis-py's TimeoutError and the
connection is dropped (a stalled Redis fails calls fast instead of piling them up); a lost
connection fails its calls with redis-py's ConnectionError and the next call reconnects; a script
unknown to Redis (NOSCRIPT after a restart or failover) is loaded and the call repeated;
error replies are redis-py's ResponseError, so the chassis maps them the same way.
Only `redis://` URLs of a standalone Redis use it (TLS, unix sockets and Cluster keep the
redis-py path).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _refuses_connection(reply: Any) -> bool:
    return isinstance(reply, ResponseError) and (
        "max number of clients reached" in str(reply) or str(reply).startswith("LOADING")
    )


class _Pipe(asyncio.Protocol):
    """One connection: replies are matched to the calls waiting on it, first come first served."""

    def __init__(self, timeout_s: float) -> None:
        self.parser = hiredis.Reader(replyError=ResponseError, encoding="utf-8")
        # (when the call is overdue, its waiter), oldest first
        self.waiting: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._watch = self._loop.call_later(timeout_s / 4, self._watchdog)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        while (reply := self.parser.gets()) is not False:
            if not self.waiting or _refuses_connection(reply):
                # Redis refusing this client (past maxclients, or still loading its data):
                # the connection is no good, as redis-py also treats it
                self._fail(RedisConnectionError(f"Redis refused the connection: {reply}"))
                return
            _, waiter = self.waiting.popleft()
            if not waiter.done():  # a caller that timed out left its place in the line
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("the Redis connection was lost"))

    def _watchdog(self) -> None:
        """Replies come in order, so an overdue oldest call means a stalled Redis: every
        call waiting fails with a timeout and the connection is dropped. One timer per
        connection instead of one per call."""
        if self.closed:
            return
        if self.waiting and self.waiting[0][0] < self._loop.time():
            self._fail(RedisTimeoutError("Redis did not answer in time"))
            return
        self._watch = self._loop.call_later(self._timeout_s / 4, self._watchdog)

    def _fail(self, error: Exception) -> None:
        self.closed = True
        self._watch.cancel()
        while self.waiting:
            _, waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        self.close()

    def send(self, command: tuple[Any, ...]) -> asyncio.Future[Any]:
        waiter: asyncio.Future[Any] = self._loop.create_future()
        if self.closed or self.transport is None:
            waiter.set_exception(RedisConnectionError("the Redis connection is closed"))
            return waiter
        self.waiting.append((self._loop.time() + self._timeout_s, waiter))
        self.transport.write(hiredis.pack_command(command))
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class PipelinedRedis:
    """Script calls over one pipelined connection (see the module's docstring)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        options = parse_url(url)
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._auth = [v for v in (options.get("username"), options.get("password")) if v]
        self._db = int(options.get("db", 0) or 0)
        self._timeout_s = timeout_s
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Lock | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return urlsplit(url).scheme == "redis"

    async def _connected(self) -> _Pipe:
        pipe = self._pipe
        if pipe is not None and not pipe.closed:
            return pipe
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._pipe is None or self._pipe.closed:
                self._pipe = await self._connect()
            return self._pipe

    async def _connect(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(1.0, self._timeout_s)):
                _, pipe = await loop.create_connection(
                    lambda: _Pipe(self._timeout_s), self._host, self._port
                )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        setup = []
        if self._auth:
            setup.append(("AUTH", *self._auth))
        if self._db:
            setup.append(("SELECT", self._db))
        for command in setup:
            reply = await pipe.send(command)
            if isinstance(reply, ResponseError):
                pipe.close()
                raise RedisConnectionError(f"Redis refused {command[0]}: {reply}")
        return pipe

    async def execute(self, *command: Any) -> Any:
        """One command; its error reply is returned (a ResponseError), not raised. A
        connection found broken before the command was answered is replaced once."""
        for attempt in range(2):
            pipe = await self._connected()
            try:
                return await pipe.send(command)
            except RedisConnectionError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def evalsha(self, sha: str, source: str, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA, loading the script on NOSCRIPT. Only idempotent scripts may come here:
        a call whose connection broke is sent again."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        reply = await self.execute(*command)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            loaded = await self.execute("SCRIPT", "LOAD", source)
            if isinstance(loaded, ResponseError):
                raise loaded
            reply = await self.execute(*command)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def aclose(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
