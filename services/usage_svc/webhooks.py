"""Webhook deliveries (docs/api.md §8): the URL guard, signatures, and the dispatcher.

Every usage-service replica runs a dispatcher. The queue lives in Redis (one "due" set per
shard): a replica claims a due delivery for one attempt under a lease (so no two replicas
make the same attempt, and one that dies mid-attempt leaves it to the next after the
lease), POSTs it, and records the answer: DELIVERED on 2xx; otherwise the next attempt,
after an exponential backoff with jitter, until the delivery is `retry_for_s` old (at
least 24 hours), then FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import random
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import orjson

from services.common.logging import get_logger
from services.common.settings import Settings
from services.usage_svc.budget_store import BudgetStorage, Claim
from services.usage_svc.keys import Layout

log = get_logger("agentplane.webhooks")


LEASE_MARGIN_S = 5.0  # a claimed attempt is another replica's to retry after timeout + this
CLAIM_BATCH = 50
MAX_CONCURRENT = 32
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


class UnsafeUrl(ValueError):
    """A webhook URL the guard refuses; the message says why."""


def _blocked(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address == ipaddress.ip_address("169.254.169.254")
        or address == ipaddress.ip_address("fd00:ec2::254")
    )


async def check_url(url: str, allow_http: bool, allow_private: bool) -> str:
    """The URL if deliveries may go there; UnsafeUrl otherwise. Checked when a webhook is
    created and again before every attempt (a name may resolve elsewhere later)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeUrl("must be an https URL")
    if parts.scheme == "http" and not allow_http:
        raise UnsafeUrl("must use https (http needs WEBHOOK_ALLOW_HTTP=true)")
    if parts.username or parts.password:
        raise UnsafeUrl("must not carry credentials")
    if allow_private:
        return url
    host = parts.hostname.rstrip(".").lower()
    if host in METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
        raise UnsafeUrl(f"host {host!r} is not allowed")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except OSError:
        raise UnsafeUrl(f"host {host!r} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if _blocked(address):
            raise UnsafeUrl(
                f"resolves to {address}, a loopback, private, link-local or metadata address "
                "(allowed only with WEBHOOK_ALLOW_PRIVATE_NETWORKS=true)"
            )
    return url


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The Agentplane-Signature value: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait before attempt `attempt + 1`: exponential, capped, with full jitter over
    its upper half (so replicas and receivers are not hit in lockstep)."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 40))
    return ceiling * (0.5 + random.random() / 2)


class Dispatcher:
    """Delivers due webhook attempts until stopped."""

    def __init__(
        self,
        store: BudgetStorage,
        layout: Layout,
        settings: Settings,
        alert_json: Callable[[Claim], dict[str, object]],
        clock: Callable[[], int],
    ) -> None:
        self._store = store
        self._layout = layout
        self._settings = settings
        self._alert_json = alert_json
        self._clock = clock
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stopping: asyncio.Event) -> None:
        async with httpx.AsyncClient(
            timeout=self._settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        ) as client:
            while not stopping.is_set():
                try:
                    await self.poll(client)
                except Exception as exc:  # Redis away: try again at the next poll
                    log.warning("webhook poll failed", error=str(exc))
                try:
                    await asyncio.wait_for(stopping.wait(), self._settings.webhook_poll_s)
                except TimeoutError:
                    pass
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.webhook_timeout_s + 1):
                    await self.settle()

    async def settle(self) -> None:
        """Wait for the attempts in flight to end."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def poll(self, client: httpx.AsyncClient) -> int:
        """Claim what is due on every shard and start its attempts; returns how many."""
        started = 0
        for shard in self._layout.shards:
            free = MAX_CONCURRENT - len(self._tasks)
            if free <= 0:
                break
            lease_ms = int((self._settings.webhook_timeout_s + LEASE_MARGIN_S) * 1000)
            for claim in await self._store.claim(shard, lease_ms, min(CLAIM_BATCH, free)):
                task = asyncio.create_task(self.attempt(client, claim))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                started += 1
        return started

    async def attempt(self, client: httpx.AsyncClient, claim: Claim) -> None:
        """One attempt of one delivery, and its outcome recorded."""
        async with self._slots:
            code, error = await self._post(client, claim)
        now = self._clock()
        if 200 <= code < 300:
            status, next_ms = "DELIVERED", 0
        elif now - claim.create_ms >= self._settings.webhook_retry_for_s * 1000:
            status, next_ms = "FAILED", 0
        else:
            wait = backoff_s(
                claim.attempt,
                self._settings.webhook_backoff_base_s,
                self._settings.webhook_backoff_max_s,
            )
            status, next_ms = "PENDING", now + int(wait * 1000)
        await self._store.finish(claim, status, code, error, next_ms)
        log.info(
            "webhook attempt", delivery=claim.member, attempt=claim.attempt, code=code,
            status=status, error=error or None,
        )  # fmt: skip

    async def _post(self, client: httpx.AsyncClient, claim: Claim) -> tuple[int, str]:
        """(HTTP status or 0, why it failed)."""
        settings = self._settings
        try:
            await check_url(
                claim.url, settings.webhook_allow_http, settings.webhook_allow_private_networks
            )
        except UnsafeUrl as exc:
            return 0, f"url refused: {exc}"
        body = orjson.dumps(self._alert_json(claim))
        timestamp = str(self._clock() // 1000)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "agentplane-webhooks/1",
            "Agentplane-Event-Id": claim.event_id,
            "Agentplane-Event-Type": claim.event_type,
            "Agentplane-Delivery-Attempt": str(claim.attempt),
            "Agentplane-Timestamp": timestamp,
            "Agentplane-Signature": signature(claim.secret, timestamp, body),
        }
        try:
            # One deadline for the whole attempt (httpx's own timeouts are per read, which a
            # receiver trickling bytes never trips), and the answer's body is never read: a
            # receiver cannot hold an attempt past its lease or fill this process's memory.
            async with asyncio.timeout(settings.webhook_timeout_s):
                async with client.stream(
                    "POST", claim.url, content=body, headers=headers
                ) as answer:
                    code = answer.status_code
        except (TimeoutError, httpx.TimeoutException):
            return 0, "timed out"
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:500]
        return code, "" if 200 <= code < 300 else f"HTTP {code}"
