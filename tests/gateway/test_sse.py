"""Server-sent events through the gateway: an upstream stream lives exactly as long as its
HTTP client, and idle streams send keep-alive comments."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import pytest

from tests.gateway.conftest import API
from tests.helpers import ADMIN_TOKEN
from tests.helpers.servers import serve_gateway


async def _open_raw(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A bare HTTP/1.1 GET that reads only the response head, as a client that then
    vanishes would."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


@pytest.mark.timeout(180)  # 2 rounds of 400 connections, and a claim-idle wait if a read raced
@pytest.mark.settings(inbox_claim_idle_s=3.0)  # that wait: 3 s at worst, not 30
async def test_dropped_sse_inbox_clients_end_their_upstream_streams_at_once(
    cluster, seeded
) -> None:
    """200 inbox streams under distinct consumer names, idle (nothing to deliver), dropped
    at once: every name is free again right away — no orphaned upstream stream keeps its
    consumer lease — and a message injected afterwards reaches a live consumer."""
    alpha, _beta, _thread = seeded
    async with serve_gateway(cluster) as url:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        assert host and port
        path = f"{API}/agents/{alpha['id']}/inbox?consumer=q"

        async def taken(names: list[int]) -> list[int]:
            """The names whose lease is still held (409), each tried once and let go."""
            busy = []
            for i in names:
                _, writer, head = await _open_raw(host, port, f"{path}{i}")
                busy += [i] if b" 409 " in head.split(b"\r\n")[0] else []
                writer.close()
                await writer.wait_closed()
            return busy

        async def freed(names: list[int], within: float) -> list[int]:
            """The names still taken after `within` seconds of trying."""
            deadline = asyncio.get_running_loop().time() + within
            busy = await taken(names)
            while busy and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.3)
                busy = await taken(busy)
            return busy

        for _round in range(2):
            opened = await asyncio.gather(
                *(_open_raw(host, port, f"{path}{i}") for i in range(200))
            )
            heads = [head.split(b"\r\n")[0] for _, _, head in opened]
            assert all(b" 200 " in h for h in heads), {h: heads.count(h) for h in heads}
            await asyncio.sleep(0.5)
            for _, writer, _ in opened:
                writer.transport.abort()  # the client vanishes without a word
            # Free within seconds (a stream notices between two blocking reads of 1 s at
            # worst); an orphan held its name for good (seen: 25 minutes).
            busy = await freed(list(range(200)), 5.0)
            assert not busy, f"{len(busy)} consumer names still leased 5 s after their clients went"
            assert not await freed(list(range(200)), 5.0)  # the checks' own streams too
        # A live consumer gets what is injected now.
        async with httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as http:
            async with http.stream("GET", f"{path}0", timeout=None) as live:
                assert live.status_code == 200
                injected = await http.post(
                    f"{API}/inject", json={"to": alpha["id"], "payload": {"task": "after"}}
                )
                assert injected.status_code == 200, injected.text

                async def first_data() -> str:
                    async for line in live.aiter_lines():
                        if line.startswith("data: "):
                            return line
                    raise AssertionError("stream ended")

                # At once, or — when a stream that was leaving read it — at the live
                # consumer's next claim: within INBOX_CLAIM_IDLE_SECONDS (3 s here) at
                # worst, not never (an orphan once kept taking messages for 25 minutes).
                assert '"after"' in await asyncio.wait_for(first_data(), 15)


async def test_idle_sse_streams_send_keep_alive_comments(cluster, seeded) -> None:
    _alpha, _beta, thread = seeded
    async with (
        serve_gateway(cluster, sse_keepalive_s=0.2) as url,
        httpx.AsyncClient(
            base_url=url, timeout=10, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as http,
    ):
        async with http.stream("GET", f"{API}/threads/{thread['id']}/events") as events:
            assert events.status_code == 200
            seen: list[str] = []

            async def comments() -> None:
                async for line in events.aiter_lines():
                    if line.startswith(":"):
                        seen.append(line)
                        if len(seen) == 3:
                            return

            await asyncio.wait_for(comments(), 5)
            assert seen == [": keep-alive"] * 3


async def test_a_stopping_gateway_ends_its_event_streams_at_once(cluster, seeded) -> None:
    """Event streams never end on their own: a gateway that stops ends them when the stop
    begins (their clients reconnect elsewhere), instead of holding the stop for the whole
    grace period (10 s here)."""
    _alpha, _beta, thread = seeded
    ended = asyncio.Event()

    async def follow(url: str, opened: asyncio.Event) -> None:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as http:
            async with http.stream("GET", f"{API}/threads/{thread['id']}/events") as events:
                assert events.status_code == 200
                opened.set()
                async for _line in events.aiter_lines():
                    pass
        ended.set()

    clock = asyncio.get_running_loop().time
    async with serve_gateway(cluster, grace_period_s=10.0) as url:
        opened = asyncio.Event()
        follower = asyncio.create_task(follow(url, opened))
        await asyncio.wait_for(opened.wait(), 10)
        stopping = clock()
    stopped = clock() - stopping
    await asyncio.wait_for(follower, 5)
    assert ended.is_set()
    assert stopped < 3, f"the open stream held the stop for {stopped:.1f} s"
