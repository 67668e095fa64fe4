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
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

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


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("fd00:ec2::254"),
}
# Not global whatever the Python version's table says (3.11 misses part of 192.0.0.0/24).
SPECIAL = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("100.64.0.0/10"))
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries: mapped (::ffff:a.b.c.d), 6to4 (2002::/16),
    NAT64 (64:ff9b::/96), or Teredo's client."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]
    return None


def _blocked(address: Address) -> bool:
    """Every address that is not globally routable (loopback, private, shared 100.64/10,
    link-local, site-local, documentation, IETF 192.0.0/24, metadata...), judged on the
    IPv4 address inside an IPv6 one when it carries one."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            return _blocked(inner)
        if address.is_site_local:
            return True
    return (
        not address.is_global
        or address.is_multicast
        or address in METADATA_ADDRESSES
        or any(address in net for net in SPECIAL if net.version == address.version)
    )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a delivery goes: `url` names the address that was checked (so a name that
    resolves elsewhere a moment later — DNS rebinding — cannot redirect it); `host` is
    the name it replaced, sent as the Host header and used for TLS (SNI and the
    certificate check); empty when the URL named an address."""

    url: str
    host: str = ""  # the Host header: the name, with the URL's port if it named one
    server_name: str = ""  # for TLS: the name alone


async def _resolve(host: str, port: int) -> list[Address]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _parsed(url: str, allow_http: bool) -> tuple[SplitResult, str, int]:
    """(the URL's parts, its host, its port) once its form is acceptable."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeUrl(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeUrl("must be an https URL")
    if parts.scheme == "http" and not allow_http:
        raise UnsafeUrl("must use https (http needs WEBHOOK_ALLOW_HTTP=true)")
    if parts.username or parts.password:
        raise UnsafeUrl("must not carry credentials")
    return parts, parts.hostname.rstrip(".").lower(), port


async def _addresses_of(host: str, port: int) -> tuple[list[Address], bool]:
    """(the addresses `host` stands for, whether it is a name rather than an address)."""
    try:
        return [ipaddress.ip_address(host)], False
    except ValueError:
        pass
    try:
        return await _resolve(host, port), True
    except OSError:
        raise UnsafeUrl(f"host {host!r} does not resolve") from None


def _refuse_name(host: str) -> None:
    """Names that stand for this machine or a cloud's metadata, before asking a resolver."""
    if host in METADATA_HOSTS or host == "localhost" or host.endswith(".localhost"):
        raise UnsafeUrl(f"host {host!r} is not allowed")


def _refuse_addresses(addresses: list[Address]) -> None:
    for address in addresses:
        if _blocked(address):
            raise UnsafeUrl(
                f"resolves to {address}, which is not a globally routable address "
                "(loopback, private, shared, link-local, metadata...; allowed only "
                "with WEBHOOK_ALLOW_PRIVATE_NETWORKS=true)"
            )


async def check_url(url: str, allow_http: bool, allow_private: bool) -> Target:
    """Where deliveries to `url` go, or UnsafeUrl. Checked when a webhook is created and
    again before every attempt, whose connection then goes to the address checked."""
    parts, host, port = _parsed(url, allow_http)
    if not allow_private:
        _refuse_name(host)
    addresses, named = await _addresses_of(host, port)
    if not allow_private:
        _refuse_addresses(addresses)
    if not named or not addresses:
        return Target(url)
    first = addresses[0]
    literal = f"[{first}]" if first.version == 6 else str(first)
    pinned = parts._replace(netloc=f"{literal}:{port}").geturl()
    return Target(pinned, host if parts.port is None else f"{host}:{parts.port}", host)


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
            target = await check_url(
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
            "Agentplane-Signature": ",".join(
                signature(secret, timestamp, body)
                for secret in (claim.secret, claim.previous_secret)
                if secret
            ),
        }
        extensions: dict[str, object] = {}
        if target.host:  # the connection goes to the checked address, named as the URL did
            headers["Host"] = target.host
            extensions["sni_hostname"] = target.server_name
        try:
            # One deadline for the whole attempt (httpx's own timeouts are per read, which a
            # receiver trickling bytes never trips), and the answer's body is never read: a
            # receiver cannot hold an attempt past its lease or fill this process's memory.
            async with asyncio.timeout(settings.webhook_timeout_s):
                async with client.stream(
                    "POST", target.url, content=body, headers=headers, extensions=extensions
                ) as answer:
                    code = answer.status_code
        except (TimeoutError, httpx.TimeoutException):
            return 0, "timed out"
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:500]
        return code, "" if 200 <= code < 300 else f"HTTP {code}"
