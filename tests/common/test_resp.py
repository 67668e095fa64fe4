"""The pipelined RESP connection (services/common/resp.py) against a real redis-server:
replies reach the right callers under concurrency, a stalled Redis fails calls within the
timeout, a restarted one is reconnected to, a flushed script is loaded again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scripts.redis_server import RedisProcess
from services.common.resp import PipelinedRedis

ECHO_SCRIPT = "return {KEYS[1], ARGV[1]}"


async def test_two_thousand_concurrent_calls_each_get_their_own_reply(redis_url) -> None:
    pipe = PipelinedRedis(redis_url, 2.0)
    replies = await asyncio.gather(*(pipe.execute("ECHO", f"call-{i}") for i in range(2000)))
    assert replies == [f"call-{i}" for i in range(2000)]
    await pipe.aclose()


async def test_scripts_load_on_noscript_and_errors_are_response_errors(redis_url) -> None:
    pipe = PipelinedRedis(redis_url, 2.0)
    sha = await pipe.execute("SCRIPT", "LOAD", ECHO_SCRIPT)
    await pipe.execute("SCRIPT", "FLUSH")  # as after a restart or failover
    assert await pipe.evalsha(sha, ECHO_SCRIPT, ["k"], [42]) == ["k", "42"]
    assert await pipe.evalsha(sha, ECHO_SCRIPT, ["k2"], ["x"]) == ["k2", "x"]
    with pytest.raises(ResponseError, match="boom"):
        await pipe.evalsha(
            await pipe.execute("SCRIPT", "LOAD", "return redis.error_reply('boom')"),
            "return redis.error_reply('boom')", [], [],
        )  # fmt: skip
    # An error reply from a plain command is returned, not raised, and the line stays in step.
    assert isinstance(await pipe.execute("HGET", "only-one-arg"), ResponseError)
    assert await pipe.execute("ECHO", "still in step") == "still in step"
    await pipe.aclose()


async def test_a_stalled_redis_fails_calls_within_the_timeout_then_recovers() -> None:
    with RedisProcess() as redis:
        pipe = PipelinedRedis(redis.url, 0.4)
        assert await pipe.execute("PING") == "PONG"
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            outcomes = await asyncio.gather(
                *(pipe.execute("INCR", "n") for _ in range(50)), return_exceptions=True
            )
            waited = time.monotonic() - began
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        assert all(isinstance(o, RedisTimeoutError) for o in outcomes), outcomes[:3]
        assert waited < 0.4 * 1.25 + 0.3
        assert await pipe.execute("PING") == "PONG"  # a new connection
        await pipe.aclose()


async def test_a_restarted_redis_is_reconnected_to_and_a_dead_one_is_unavailable() -> None:
    with RedisProcess() as redis:
        pipe = PipelinedRedis(redis.url, 1.0)
        await pipe.execute("SET", "k", "v")
        redis.stop()
        redis.start()  # same port, empty
        assert await pipe.execute("ECHO", "back") == "back"  # invisible to the caller
        redis.stop()
        with pytest.raises(RedisConnectionError):
            await pipe.execute("PING")
        redis.start()
        assert await pipe.execute("PING") == "PONG"
        await pipe.aclose()


async def test_the_url_selects_the_database_and_sends_the_password() -> None:
    with RedisProcess() as redis:
        setup = PipelinedRedis(redis.url, 1.0)
        assert await setup.execute("CONFIG", "SET", "requirepass", "s3cret") == "OK"
        await setup.aclose()
        url = f"redis://:s3cret@127.0.0.1:{redis.port}/3"
        pipe = PipelinedRedis(url, 1.0)
        await pipe.execute("SET", "where", "db3")
        assert " db=3 " in await pipe.execute("CLIENT", "INFO")
        await pipe.aclose()
        wrong = PipelinedRedis(f"redis://:nope@127.0.0.1:{redis.port}/0", 1.0)
        with pytest.raises(RedisConnectionError, match="AUTH"):
            await wrong.execute("PING")


async def test_a_redis_that_refuses_new_clients_gives_a_connection_error() -> None:
    """Past maxclients Redis writes an error to a new connection, unasked, and closes it."""
    with RedisProcess() as redis:
        admin = PipelinedRedis(redis.url, 1.0)
        assert await admin.execute("CONFIG", "SET", "maxclients", "1") == "OK"
        refused = PipelinedRedis(redis.url, 1.0)
        with pytest.raises(RedisConnectionError):
            await refused.execute("PING")
        await admin.aclose()
