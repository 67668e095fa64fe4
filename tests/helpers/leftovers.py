"""Scanning Redis for what an item left behind: every key, and every member, field,
value and stream entry inside every key, that mentions one of the given ids."""

from __future__ import annotations

from typing import Any

import redis as redis_sync
from redis.cluster import RedisCluster


def client(url: str, cluster: bool) -> Any:
    if cluster:
        return RedisCluster.from_url(url, decode_responses=True)
    return redis_sync.Redis.from_url(url, decode_responses=True)


def _contents(r: Any, key: str) -> list[str]:
    kind = r.type(key)
    if kind == "string":
        return [r.get(key) or ""]
    if kind == "hash":
        return [item for pair in r.hgetall(key).items() for item in pair]
    if kind == "set":
        return list(r.smembers(key))
    if kind == "zset":
        return list(r.zrange(key, 0, -1))
    if kind == "list":
        return list(r.lrange(key, 0, -1))
    if kind == "stream":
        found: list[str] = []
        for entry_id, fields in r.xrange(key):
            found += [entry_id, *(item for pair in fields.items() for item in pair)]
        return found
    return []


def mentions(url: str, cluster: bool, needles: list[str]) -> dict[str, list[str]]:
    """{key: what in it mentions a needle} over the whole database (every master)."""
    r = client(url, cluster)
    try:
        found: dict[str, list[str]] = {}
        for key in r.scan_iter(count=1000):
            hits = [key] if any(n in key for n in needles) else []
            hits += [c for c in _contents(r, key) if any(n in c for n in needles)]
            if hits:
                found[key] = hits
        return found
    finally:
        r.close()


def ttl(url: str, cluster: bool, key: str) -> int:
    r = client(url, cluster)
    try:
        return int(r.ttl(key))
    finally:
        r.close()


def lasting(url: str, cluster: bool, needles: list[str]) -> dict[str, list[str]]:
    """`mentions`, leaving out keys that expire by themselves (they carry a TTL)."""
    return {k: v for k, v in mentions(url, cluster, needles).items() if ttl(url, cluster, k) < 0}


async def settled(
    url: str, cluster: bool, needles: list[str], timeout: float = 10.0
) -> dict[str, list[str]]:
    """What still mentions the needles once removal is over: each service removes its own
    part on its own sweep, so this waits (up to `timeout`) for nothing lasting to be left,
    and returns what is left then."""
    import contextlib

    from tests.helpers import until

    async def clean() -> bool:
        return not lasting(url, cluster, needles)

    with contextlib.suppress(TimeoutError):
        await until(clean, timeout)
    return lasting(url, cluster, needles)
