"""List paging: page sizes, opaque page tokens, and pages read from lexicographic indexes.

A page token carries the last member of the previous page (a cursor, so inserts between
pages cause no duplicates or gaps) and a fingerprint of the query's filters, so a token
cannot be replayed against another query. Tokens are base64url JSON: opaque to callers,
checked on the way in (a bad one is INVALID_ARGUMENT on `page_token`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from services.common import errors
from services.common.limits import MAX_PAGE_SIZE, MAX_PAGE_TOKEN_LENGTH
from services.common.redis import RedisClient


@dataclass(frozen=True, slots=True)
class Page:
    size: int
    cursor: str | None
    skip: int
    fingerprint: str

    def token_after(self, last_member: str) -> str:
        body = json.dumps({"c": last_member, "f": self.fingerprint}, separators=(",", ":"))
        return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def fingerprint(*filters: object) -> str:
    return hashlib.blake2b(repr(filters).encode(), digest_size=6).hexdigest()


def parse_page(
    page_size: int, page_token: str, skip: int, filters: tuple[object, ...], default_size: int = 20
) -> Page:
    """Check and normalise paging fields: default size, clamp to 100, decode the token."""
    if page_size < 0:
        raise errors.invalid_argument("page_size", "must not be negative")
    if skip < 0:
        raise errors.invalid_argument("skip", "must not be negative")
    size = min(page_size or default_size, MAX_PAGE_SIZE)
    want = fingerprint(*filters)
    cursor = None
    if len(page_token) > MAX_PAGE_TOKEN_LENGTH:
        raise errors.invalid_argument("page_token", "malformed page token")
    if page_token:
        try:
            padded = page_token + "=" * (-len(page_token) % 4)
            decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
            cursor, got = decoded["c"], decoded["f"]
            if not isinstance(cursor, str) or not isinstance(got, str):
                raise TypeError
        except (ValueError, TypeError, KeyError, binascii.Error, RecursionError):
            raise errors.invalid_argument("page_token", "malformed page token") from None
        if got != want:
            raise errors.invalid_argument(
                "page_token", "page token belongs to a query with other filters"
            )
    return Page(size=size, cursor=cursor, skip=skip, fingerprint=want)


async def read_lex_page(
    redis: RedisClient, key: str, page: Page, *, newest_first: bool
) -> tuple[list[str], str, int]:
    """One page of a score-0 sorted set in member order: (members, next token, total).

    Members sort by their text (ULIDs, or "<ulid>|<id>"), so ordering by member is ordering
    by creation time. One round trip: the range and the count in one pipeline.
    """
    if newest_first:
        start = f"({page.cursor}" if page.cursor else "+"
        args = ["ZRANGE", key, start, "-", "BYLEX", "REV"]
    else:
        start = f"({page.cursor}" if page.cursor else "-"
        args = ["ZRANGE", key, start, "+", "BYLEX"]
    args += ["LIMIT", str(page.skip), str(page.size + 1)]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.execute_command(*args)
        pipe.zcard(key)
        members, total = await pipe.execute()
    next_token = page.token_after(members[page.size - 1]) if len(members) > page.size else ""
    return list(members[: page.size]), next_token, int(total)
