"""The usage service's domain values: a usage record, a reservation's hold, a thread
budget's state, the outcomes the scripts answer, usage counters and a time-series query,
and how a record is encoded for record_usage.lua. Values only: no storage here."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One checked record, with its cost already resolved."""

    usage_id: str
    thread_id: str
    agent_id: str
    project_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    latency_ms: int
    unpriced: bool
    reservation_id: str
    fingerprint: str
    key_id: str = ""  # the API key that recorded it ("" for the admin token)
    cached_prompt_tokens: int = 0  # part of prompt_tokens
    reasoning_tokens: int = 0  # part of completion_tokens
    cache_write_tokens: int = 0  # part of prompt_tokens
    estimated: bool = False  # the counts are an estimate (no usage from the provider)
    call: str = ""  # the model gateway's call-log entry ('<ulid>|<base64>'), if any
    response_id: str = ""  # the provider's id of the call's answer, if any


@dataclass(frozen=True, slots=True)
class Hold:
    """A checked reservation request."""

    reservation_id: str
    thread_id: str
    tokens: int
    cost_micros: int  # the estimate cost-limited budgets hold
    ttl_ms: int
    agent_id: str = ""
    model: str = ""
    key_id: str = ""
    project_id: str = ""  # the covering budgets' project when there is no thread
    charge_on_expiry: bool = False  # recorded in full (estimated) if it expires unsettled
    least_tokens: int = 0  # > 0: hold as many as fit, at most `tokens`, at least this


@dataclass(frozen=True, slots=True)
class BudgetState:
    thread_id: str
    has_budget: bool
    max_tokens: int
    prompt_tokens: int
    completion_tokens: int
    reserved_tokens: int
    closed: bool
    update_ms: int

    @classmethod
    def from_reply(cls, thread_id: str, values: Sequence[int]) -> BudgetState:
        has, max_tokens, prompt, completion, reserved, closed, update_ms = (int(v) for v in values)
        return cls(
            thread_id, bool(has), max_tokens, prompt, completion, reserved, bool(closed), update_ms
        )


class Outcome(enum.StrEnum):
    """What a write script answered (the same words as the Lua scripts return)."""

    NEW = "NEW"  # a record counted for the first time
    DUPLICATE = "DUPLICATE"  # a record seen before: counted once, first answer again
    CONFLICT = "CONFLICT"  # a usage or reservation id seen before with another body
    FOREIGN = "FOREIGN"  # the thread's budget belongs to another project
    OK = "OK"
    NO_BUDGET = "NO_BUDGET"
    CLOSED = "CLOSED"  # the thread's budget is closed: no new reservations
    EXHAUSTED = "EXHAUSTED"  # the reservation does not fit in the budget


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    outcome: Outcome  # NEW | DUPLICATE | CONFLICT | FOREIGN
    cost_micros: int = 0
    budget: BudgetState | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one budget refused a reservation."""

    subject: str  # "thread:<id>" or "budget:<id>"
    kind: str  # thread | calendar | window | inflight
    wait_ms: int  # until room frees; -1 when waiting does not help

    @classmethod
    def from_reply(cls, item: str) -> Refusal:
        """From reserve.lua's 'thread:<id>' or 'budget:<id>|<kind>|<ms>'."""
        if item.startswith("thread:"):
            return cls(item, "thread", -1)
        subject, kind, wait = item.split("|")
        return cls(subject, kind, int(wait))


@dataclass(frozen=True, slots=True)
class BudgetChange:
    """The answer of a budget write (reserve, release, close)."""

    outcome: Outcome
    state: BudgetState
    expire_ms: int = 0  # reserve: when the hold lapses
    tokens: int = 0  # reserve: the tokens held
    released: bool = False  # release: whether a live reservation was given back
    refused: list[Refusal] = field(default_factory=list)  # reserve: who refused, and why


@dataclass(slots=True)
class Counters:
    prompt: int = 0
    completion: int = 0
    requests: int = 0
    cost_micros: int = 0
    latency_sum_ms: int = 0
    unpriced: int = 0
    cached_prompt: int = 0
    reasoning: int = 0
    cache_write: int = 0
    estimated: int = 0  # records whose counts are an estimate

    def add(self, raw: dict[str, str]) -> Counters:
        self.prompt += int(raw.get("p", 0))
        self.completion += int(raw.get("c", 0))
        self.requests += int(raw.get("n", 0))
        self.cost_micros += int(raw.get("cost", 0))
        self.latency_sum_ms += int(raw.get("lat", 0))
        self.unpriced += int(raw.get("unp", 0))
        self.cached_prompt += int(raw.get("cp", 0))
        self.reasoning += int(raw.get("rs", 0))
        self.cache_write += int(raw.get("cw", 0))
        self.estimated += int(raw.get("est", 0))
        return self

    def add_bucket(self, packed: str) -> Counters:
        """Add a time-series bucket's counters ("p,c,n,cost,lat,unp,cached,reasoning,
        cache write,estimated"; buckets written before the last two have eight)."""
        values = [int(v) for v in packed.split(",")] + [0, 0]
        p, c, n, cost, lat, unp, cached, reasoning, cache_write, estimated = values[:10]
        self.cache_write += cache_write
        self.estimated += estimated
        self.prompt += p
        self.completion += c
        self.requests += n
        self.cost_micros += cost
        self.latency_sum_ms += lat
        self.unpriced += unp
        self.cached_prompt += cached
        self.reasoning += reasoning
        return self


@dataclass(slots=True)
class Overview:
    totals: Counters
    by_agent: list[tuple[str, Counters]] = field(default_factory=list)
    by_model: list[tuple[str, Counters]] = field(default_factory=list)
    active_threads: int = 0


# What record_usage.lua reads of each record, in order (its header lists the same).
RECORD_FIELDS = (
    "fingerprint", "usage id", "prompt", "completion", "cost micros", "latency ms",
    "unpriced", "reservation id", "agent id", "model", "thread id", "project id",
    "API key id", "cached prompt", "reasoning", "cache write", "estimated", "call ulid",
    "call", "response id",
)  # fmt: skip


def record_fields(r: UsageRecord, project: str) -> str:
    """One record as record_usage.lua takes it: RECORD_FIELDS joined by '|'."""
    return (
        f"{r.fingerprint}|{r.usage_id}|{r.prompt_tokens}|{r.completion_tokens}|"
        f"{r.cost_micros}|{r.latency_ms}|{int(r.unpriced)}|{r.reservation_id}|"
        f"{r.agent_id}|{r.model}|{r.thread_id}|{project}|{r.key_id}|"
        f"{r.cached_prompt_tokens}|{r.reasoning_tokens}|{r.cache_write_tokens}|{int(r.estimated)}"
        + (f"|{r.call}|{r.response_id}" if r.call else "")
    )


Clock = Callable[[], int]  # Unix ms; tests move it instead of sleeping


HOUR_MS = 3_600_000
DAY_MS = 86_400_000
ALL = "-"  # the whole installation


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    """A checked time-series request: buckets [start, end) of `step_ms`, grouped by
    "" (none), "agent" or "model", optionally limited to one agent or one model."""

    project_id: str  # or ALL
    start_ms: int
    end_ms: int
    step_ms: int
    group_by: str = ""
    agent_id: str = ""
    model: str = ""

    def field(self) -> str:
        """The one bucket field to read, when one is enough."""
        if self.group_by == "agent":
            return f"a:{self.agent_id}" if self.agent_id else ""
        if self.group_by == "model":
            return f"m:{self.model}" if self.model else ""
        if self.agent_id:
            return f"a:{self.agent_id}"
        return f"m:{self.model}" if self.model else "t"

    def group_of(self, field: str) -> str | None:
        """The group a bucket field counts in, or None when it is not wanted."""
        if self.group_by == "agent":
            return field[2:] if field.startswith("a:") else None
        if self.group_by == "model":
            return field[2:] if field.startswith("m:") else None
        return "" if field == self.field() else None
