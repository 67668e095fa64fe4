"""Who is calling, and how often they may.

Every RPC names a principal with `authorization: Bearer <token>`: the bootstrap superuser
(AGENTPLANE_ADMIN_TOKEN, compared in constant time) or an API key (`apk_<key id>.<secret>`,
256 random bits, stored only as a SHA-256 hash by the agent service). The agent service
looks keys up in its own storage; the other services ask it (`WhoAmI`, with the caller's
own token). Answers are cached per replica for AUTH_CACHE_SECONDS, which bounds how long a
revoked key keeps working.

Rate limits are per principal and method, shared by all replicas through one Lua script
(GCRA). The superuser is not limited. When Redis cannot answer, reads are let through and
writes are refused (UNAVAILABLE): a limiter must not be a way around itself for writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common import errors, methods, tuning
from services.common.rates import Rate
from services.common.redis import HotScript, RedisClient, load_script
from services.common.resp import PipelinedRedis

SUPERUSER, OWNER, AGENT = "SUPERUSER", "OWNER", "AGENT"
TOKEN_PATTERN = re.compile(r"^apk_([0-9a-z]{26})\.([A-Za-z0-9_-]{43,64})$")


@dataclass(frozen=True, slots=True)
class Principal:
    role: str
    subject: str
    project_id: str = ""
    key_id: str = ""
    agent_terminated: bool = False  # an AGENT key whose agent is TERMINATED writes nothing

    @property
    def is_superuser(self) -> bool:
        return self.role == SUPERUSER

    @property
    def label(self) -> str:
        return f"{self.role.lower()}:{self.subject}"


ADMIN = Principal(SUPERUSER, "admin")


INTERNAL_HEADER = "x-agentplane-internal"


def internal_proof(secret: str, authorization: str) -> str:
    """Marks a call one service makes on behalf of a caller it already admitted: an HMAC of
    the forwarded credentials under the cluster's shared secret (the superuser token,
    which no ordinary caller has). Such calls are authenticated as usual but not rate
    limited again: the caller was counted once, at the edge."""
    return hmac.new(secret.encode(), authorization.encode(), hashlib.sha256).hexdigest()


def token_hash(token: str) -> str:
    """Tokens carry 256 random bits, so a plain SHA-256 is a safe way to store them."""
    return hashlib.sha256(token.encode()).hexdigest()


def unauthenticated(message: str) -> errors.ServiceError:
    return errors.ServiceError(
        message, reason="UNAUTHENTICATED", code=grpc.StatusCode.UNAUTHENTICATED
    )


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise unauthenticated("missing authorization: send 'authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip() or len(token) > 512:
        raise unauthenticated("malformed authorization: expected 'Bearer <token>'")
    return token.strip()


KeyLookup = Callable[[str, str], Awaitable[Principal | None]]


class Authenticator:
    """Token → principal: the admin token locally, API keys through `lookup`, cached.

    Without an admin token of its own (the gateway may run without it), every well-formed
    bearer token is looked up."""

    @staticmethod
    async def no_keys(_key_id: str, _token: str) -> Principal | None:
        """The lookup of a process that knows no API keys (until it is given one)."""
        return None

    def __init__(self, admin_token: str, lookup: KeyLookup, cache_s: float) -> None:
        self._admin = admin_token
        self._lookup = lookup
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._pending: dict[str, asyncio.Future[Principal]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        # A header seen within AUTH_CACHE_SECONDS answers from the cache at once: keyed by
        # the header itself (the process holds the tokens it is sent anyway), so a hot
        # caller costs one dictionary lookup, not a parse and a hash per call.
        cached = self._cache.get(authorization) if authorization else None
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        if not authorization:
            raise unauthenticated("missing authorization: send 'authorization: Bearer <token>'")
        # One lookup per header at a time: a thousand calls arriving together with a key
        # not yet cached wait for one answer instead of each asking (and timing out).
        pending = self._pending.get(authorization)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve(authorization))
            self._pending[authorization] = pending
            pending.add_done_callback(lambda _: self._pending.pop(authorization, None))
        return await asyncio.shield(pending)

    async def _resolve(self, authorization: str) -> Principal:
        now = time.monotonic()
        token = bearer_token(authorization)
        if self._admin and hmac.compare_digest(token.encode(), self._admin.encode()):
            return ADMIN
        match = TOKEN_PATTERN.match(token)
        if match is None and self._admin:
            raise unauthenticated("malformed or unknown token")
        principal = await self._lookup(match.group(1) if match else "", token)
        if principal is None:
            self._cache.pop(authorization, None)
            raise unauthenticated("unknown or revoked token")
        if len(self._cache) > tuning.MAX_CACHED_ENTRIES:
            self._cache.clear()
        self._cache[authorization] = (now + self._cache_s, principal)
        return principal


class RateLimiter:
    """Per principal and method limits; RESOURCE_EXHAUSTED with RetryInfo past them."""

    def __init__(
        self, redis: RedisClient, key_prefix: str, limits: dict[str, Rate],
        pipe: PipelinedRedis | None = None,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._prefix = key_prefix
        self._limits = limits
        # On every limited call: over the pipelined connection when there is one. (A call
        # whose connection broke is sent again, as redis-py's one retry does: at worst one
        # call counted twice, never one let through uncounted.)
        self._script = HotScript(
            load_script(redis, Path(__file__).with_name("lua") / "gcra.lua"), pipe
        )

    def rate_for(self, method_name: str) -> Rate:
        if method_name in self._limits:
            return self._limits[method_name]
        return self._limits["default_read" if methods.is_read(method_name) else "default_write"]

    async def check(self, principal: Principal, method_name: str) -> None:
        if principal.is_superuser:
            return
        rate = self.rate_for(method_name)
        interval = 60_000 / rate.per_minute
        key = f"{self._prefix}rl:{{{principal.label}}}:{method_name}"
        try:
            allowed, retry_ms = await self._script(
                keys=[key], args=[int(time.time() * 1000), interval, interval * rate.burst]
            )
        except Exception as exc:  # Redis unreachable: reads pass, writes are refused
            if methods.is_read(method_name):
                return
            raise errors.unavailable("rate limiter unavailable; writes are refused") from exc
        if not allowed:
            raise errors.resource_exhausted(
                f"rate limit for {method_name}: {rate.per_minute}/min",
                "RATE_LIMITED",
                subject=f"{principal.label}:{method_name}",
                retry_after_s=max(0.001, retry_ms / 1000),
            )


class Guard:
    """Authentication then rate limiting, for every RPC of a process."""

    def __init__(
        self, authenticator: Authenticator, limiter: RateLimiter | None, secret: str = ""
    ) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.secret = secret

    def is_internal(self, authorization: str | None, proof: str | None) -> bool:
        if not (self.secret and authorization and proof):
            return False
        return hmac.compare_digest(proof, internal_proof(self.secret, authorization))

    async def admit(
        self, authorization: str | None, method_name: str, proof: str | None = None
    ) -> tuple[Principal, bool]:
        """(the caller, whether a service made this call on its behalf)."""
        principal = await self.authenticator.authenticate(authorization)
        if principal.agent_terminated and not methods.is_read(method_name):
            raise errors.permission_denied(
                f"agent {principal.subject!r} is TERMINATED: its key can no longer write",
                "AGENT_TERMINATED",
            )
        internal = self.is_internal(authorization, proof)
        if self.limiter is not None and not internal:
            await self.limiter.check(principal, method_name)
        return principal, internal
