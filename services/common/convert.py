"""Small conversions shared by the services: ids, times, request-field checks."""

from __future__ import annotations

import re
import time

from google.protobuf import timestamp_pb2
from ulid import ULID

from services.common import errors
from services.common.limits import MAX_ID_LENGTH, MAX_MODEL_LENGTH

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# A provider's id of its answer (`chatcmpl-...`, `resp_...`, `msg_...`) as the model
# gateway keeps it and OTLP ingestion looks it up; other ids are not kept.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # control characters other than \t and \n


def new_id() -> str:
    """A new server-made id: a ULID, so ids sort by creation time."""
    return str(ULID())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def timestamp(ms: int | str | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from epoch milliseconds; None when unset."""
    if ms in (None, "", 0, "0"):
        return None
    value = timestamp_pb2.Timestamp()
    value.FromMilliseconds(int(ms))
    return value


def require_id(field: str, value: str, max_length: int = MAX_ID_LENGTH) -> str:
    """An id of sane length, printable, without '|' (a separator in storage); never empty
    (an empty entry of a list of ids; a field that must be set says so in the contract)."""
    if not value:
        raise errors.invalid_argument(field, "must not be empty")
    if len(value) > max_length:
        raise errors.invalid_argument(field, f"is longer than {max_length} characters")
    if not value.isprintable() or "|" in value:
        raise errors.invalid_argument(field, "contains characters that are not allowed")
    return value


def require_model(field: str, value: str) -> str:
    """A model name or price pattern: an id of up to MAX_MODEL_LENGTH (200) characters —
    the one limit for every field that names a model."""
    return require_id(field, value, MAX_MODEL_LENGTH)


def require_client_id(field: str, value: str, default: str | None = None) -> str:
    """An id the client chooses for something it creates (a thread, an idempotency key, an
    inbox consumer): letters, digits, '-', '_' and '.', at most 128, and not '.' or '..',
    so that it can stand in any URL path segment as it is. Unset: `default` if given."""
    if not value:
        if default is not None:
            return default
        raise errors.invalid_argument(field, "must not be empty")
    if not CLIENT_ID.match(value) or value in (".", ".."):
        raise errors.invalid_argument(
            field,
            f"must be 1-{MAX_ID_LENGTH} letters, digits, '-', '_' or '.' (and not '.' or '..')",
        )
    return value


def require_slug(field: str, value: str) -> str:
    if not value:
        raise errors.invalid_argument(field, "must not be empty")
    if not SLUG.match(value):
        raise errors.invalid_argument(
            field,
            "must be 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    return value


def require_text(field: str, value: str, max_length: int) -> str:
    """Free text of at most `max_length`, without control characters. (Whether it must be
    set is the contract's to say: `field_behavior` REQUIRED, checked by the chassis.)"""
    if len(value) > max_length:
        raise errors.invalid_argument(field, f"is longer than {max_length} characters")
    if CONTROL.search(value):
        raise errors.invalid_argument(field, "contains control characters")
    return value
