"""The operators' routes whose JSON differs from their RPC's messages (docs/api.md §3).

One declarative entry per route: the status code, fixed request fields, the legacy
paging parameters (`limit`/`offset` or `page`/`limit`) and how to reshape the answer.
Everything else about these routes — matching, parsing, errors — is the generic path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import errors

OFFSET = "offset"  # ?limit=1..100&offset=0..
PAGE = "page"  # ?page=1..&limit=1..100


@dataclass(frozen=True)
class Paging:
    limit: int
    offset: int
    page: int


@dataclass(frozen=True)
class Compat:
    status: int = 200
    fixed: Mapping[str, Any] = field(default_factory=dict)
    paging: str = ""
    reshape: Callable[[dict[str, Any], Paging, dict[str, str]], Any] | None = None


def _int_param(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.invalid_argument(name, f"{raw!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise errors.invalid_argument(name, f"must be between {lo} and {hi}")
    return value


def legacy_paging(style: str, query: Mapping[str, str]) -> tuple[Paging, dict[str, int]]:
    """The legacy parameters, checked, and the request fields they become."""
    limit = _int_param(query, "limit", 20, 1, 100)
    if style == PAGE:
        page = _int_param(query, "page", 1, 1, 10**6)
        offset = (page - 1) * limit
    else:
        offset = _int_param(query, "offset", 0, 0, 10**7)
        page = offset // limit + 1
    return Paging(limit, offset, page), {"page_size": limit, "skip": offset}


def _pagination(answer: dict[str, Any], paging: Paging, _path: dict[str, str]) -> dict[str, Any]:
    total = answer["total_size"]
    pages = math.ceil(total / paging.limit) if total else 0
    return {
        "data": answer["agents"],
        "pagination": {
            "total": total, "page": paging.page, "page_size": paging.limit, "total_pages": pages,
            "has_next": paging.page < pages, "has_prev": paging.page > 1,
        },
    }  # fmt: skip


def _listing(key: str) -> Callable[[dict[str, Any], Paging, dict[str, str]], dict[str, Any]]:
    def reshape(answer: dict[str, Any], paging: Paging, _path: dict[str, str]) -> dict[str, Any]:
        return {
            key: answer[key], "count": len(answer[key]), "total": answer["total_size"],
            "offset": paging.offset, "limit": paging.limit,
        }  # fmt: skip

    return reshape


def _with_cost(totals: dict[str, Any]) -> dict[str, Any]:
    """UsageTotals with the seed's `total_cost` (USD) beside `total_cost_usd`."""
    return {**totals, "total_cost": totals["total_cost_usd"]}


def _flat(key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """AgentUsage/ModelUsage in the seed's flat shape: {"agent_id", "total_tokens", ...,
    "total_cost"} instead of {"agent_id", "totals": {...}}."""

    def flatten(entry: dict[str, Any]) -> dict[str, Any]:
        return {key: entry[key], **_with_cost(entry["totals"] or _ZERO_TOTALS)}

    return flatten


_ZERO_TOTALS = {
    "total_tokens": 0, "prompt_tokens": 0, "completion_tokens": 0, "request_count": 0,
    "total_cost_usd": 0.0, "avg_latency_ms": 0.0, "total_cost_micros": 0,
    "unpriced_request_count": 0,
}  # fmt: skip
_flat_agent, _flat_model = _flat("agent_id"), _flat("model")


def _usage(answer: dict[str, Any], _paging: Paging, _path: dict[str, str]) -> dict[str, Any]:
    return {
        "usage": {
            **answer,
            "totals": _with_cost(answer["totals"] or _ZERO_TOTALS),
            "by_agent": [_flat_agent(a) for a in answer["by_agent"]],
            "by_model": [_flat_model(m) for m in answer["by_model"]],
        }
    }


COMPAT: dict[tuple[str, str], Compat] = {
    ("GET", "/api/v1/capabilities"): Compat(
        reshape=lambda a, _p, _v: {"capabilities": a["agent_types"], "count": a["total_size"]}
    ),
    ("GET", "/api/v1/agents"): Compat(fixed={"project_id": "-"}, paging=OFFSET),
    ("GET", "/api/v1/agents/{agent_id}/config"): Compat(
        reshape=lambda a, _p, _v: {
            k: a[k] for k in ("name", "description", "agent_type_id", "peers")
        }
    ),
    ("GET", "/api/v1/threads"): Compat(paging=OFFSET, reshape=_listing("threads")),
    # The seed's ThreadInfo: the thread's own fields at the top, its latest messages beside.
    ("GET", "/api/v1/threads/{thread_id}"): Compat(
        reshape=lambda a, _p, _v: {**(a["thread"] or {}), "messages": a["messages"]}
    ),
    ("GET", "/api/v1/messages"): Compat(
        fixed={"thread_id": "-"}, paging=OFFSET, reshape=_listing("messages")
    ),
    ("GET", "/api/v1/usage"): Compat(reshape=_usage),
    ("GET", "/api/v1/usage/agents/{agent_id}"): Compat(reshape=lambda a, _p, _v: _flat_agent(a)),
    ("GET", "/api/v1/usage/models/{model}"): Compat(reshape=lambda a, _p, _v: _flat_model(a)),
    ("GET", "/api/v1/usage/threads"): Compat(
        reshape=lambda a, _p, _v: {
            "threads": a["threads"],
            "count": len(a["threads"]),
            "default_max_tokens": a["default_max_tokens"],
        }
    ),
    ("POST", "/api/v1/projects/{project_id}/agents"): Compat(status=201),
    ("GET", "/api/v1/projects/{project_id}/agents"): Compat(paging=PAGE, reshape=_pagination),
    ("DELETE", "/api/v1/projects/{project_id}/agents/{agent_id}"): Compat(
        reshape=lambda a, _p, v: {"success": True, "message": f"agent {v['agent_id']} terminated"}
    ),
}
