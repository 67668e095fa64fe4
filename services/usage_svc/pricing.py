"""Model prices with effective times (docs/api.md §9).

A price is for an exact model name or a pattern ending in "*" (the longest match wins),
in USD per million prompt, completion and cached-prompt tokens plus USD per call, from
its effective time on: a record is priced with the newest price whose effective time is
at or before the record's arrival, so a later change never rewrites the past.

Prices live in Redis (`ap:usage:prices`, one small hash) and every replica keeps a copy,
re-read at most every REFRESH_S. The file table (prices.json beside this file, and
PRICE_TABLE_PATH's entries on top) seeds Redis once per installation, effective since
the epoch. Costs are integers in micro-USD: USD per million tokens is micro-USD per token.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.redis import RedisClient
from services.common.settings import SettingsError

DEFAULTS = Path(__file__).with_name("prices.json")
KEY = "ap:usage:prices"
SEEDED = "ap:usage:prices:seeded"
REFRESH_S = 1.0
MAX_PRICES_PER_MODEL = 50  # dated entries one model or pattern keeps
MAX_PRICED_MODELS = 2000  # models and patterns with prices


class PriceTableError(SettingsError):
    """The price file is unreadable or malformed; the message says where."""


class TooManyPrices(ValueError):
    """A price that would grow the table past its bounds; the message says which."""


@dataclass(frozen=True, slots=True)
class Price:
    prompt_per_million: float
    completion_per_million: float
    cached_prompt_per_million: float | None = None  # None: the prompt price
    per_request: float = 0.0
    cache_write_per_million: float | None = None  # None: the prompt price

    @property
    def cached(self) -> float:
        return (
            self.prompt_per_million
            if self.cached_prompt_per_million is None
            else self.cached_prompt_per_million
        )

    @property
    def cache_write(self) -> float:
        return (
            self.prompt_per_million
            if self.cache_write_per_million is None
            else self.cache_write_per_million
        )

    def encode(self) -> str:
        return json.dumps([self.prompt_per_million, self.completion_per_million,
                           self.cached_prompt_per_million, self.per_request,
                           self.cache_write_per_million])  # fmt: skip

    @classmethod
    def decode(cls, text: str) -> Price:
        p, c, cp, r, *rest = json.loads(text)  # (prices stored before cache writes: four)
        cw = rest[0] if rest else None
        return cls(float(p), float(c), None if cp is None else float(cp), float(r),
                   None if cw is None else float(cw))  # fmt: skip


@dataclass(frozen=True, slots=True)
class DatedPrice:
    model: str
    effective_ms: int
    price: Price


def read_file(path: Path) -> dict[str, Price]:
    try:
        models = json.loads(path.read_text())["models"]
        prices = {
            str(name): Price(float(p["prompt"]), float(p["completion"]),
                             None if p.get("cached_prompt") is None else float(p["cached_prompt"]),
                             float(p.get("per_request", 0.0)))
            for name, p in models.items()
        }  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PriceTableError(f"price table {path}: {exc}") from None
    for model, price in prices.items():
        if min(price.prompt_per_million, price.completion_per_million, price.cached,
               price.per_request) < 0:  # fmt: skip
            raise PriceTableError(f"price table {path}: price of {model!r} is negative")
    return prices


def file_prices(override: str = "") -> dict[str, Price]:
    prices = read_file(DEFAULTS)
    if override:
        prices.update(read_file(Path(override)))
    return prices


class PriceBook:
    """Every dated price, looked up by model and time."""

    def __init__(self, prices: list[DatedPrice] | None = None) -> None:
        self._by_model: dict[str, list[tuple[int, Price]]] = {}
        for dated in prices or []:
            self._by_model.setdefault(dated.model, []).append((dated.effective_ms, dated.price))
        for versions in self._by_model.values():
            versions.sort(key=lambda v: v[0])
        self._times = {m: [when for when, _ in v] for m, v in self._by_model.items()}
        # Patterns, longest first: the first one with a price in force wins.
        self._patterns = sorted(
            (m for m in self._by_model if m.endswith("*")), key=len, reverse=True
        )

    @classmethod
    def from_file(cls, override: str = "") -> PriceBook:
        return cls([DatedPrice(m, 0, p) for m, p in file_prices(override).items()])

    def versions(self, model: str) -> list[int]:
        """The effective times of `model`'s prices, oldest first."""
        return list(self._times.get(model, ()))

    def __len__(self) -> int:
        """How many models and patterns have prices."""
        return len(self._by_model)

    def entries(self) -> list[DatedPrice]:
        return [
            DatedPrice(model, when, price)
            for model in sorted(self._by_model)
            for when, price in self._by_model[model]
        ]

    def price(self, model: str, at_ms: int) -> Price | None:
        """The price in force for `model` at `at_ms`: an exact name first, then the longest
        matching pattern that has a price in force then."""
        found = self._in_force(model, at_ms)
        if found is not None:
            return found
        for pattern in self._patterns:
            if model.startswith(pattern[:-1]):
                found = self._in_force(pattern, at_ms)
                if found is not None:
                    return found
        return None

    def _in_force(self, name: str, at_ms: int) -> Price | None:
        times = self._times.get(name)
        if not times:
            return None
        at = bisect.bisect_right(times, at_ms)
        return self._by_model[name][at - 1][1] if at else None

    def cost_micros(
        self, model: str, prompt: int, completion: int, cached: int, at_ms: int,
        cache_write: int = 0,
    ) -> int | None:  # fmt: skip
        """Cost in micro-USD, or None when the model has no price then. Cache reads and
        writes are parts of `prompt`, each at its own price."""
        price = self.price(model, at_ms)
        if price is None:
            return None
        return round(
            (prompt - cached - cache_write) * price.prompt_per_million
            + cached * price.cached
            + cache_write * price.cache_write
            + completion * price.completion_per_million
            + price.per_request * 1_000_000
        )

    def estimate_micros(self, model: str, tokens: int, at_ms: int) -> int:
        """What a cost-limited budget holds for a reservation: the tokens at the model's
        highest per-token price, plus one call, rounded up; 0 for an unknown model."""
        price = self.price(model, at_ms)
        if price is None:
            return 0
        per_token = max(price.prompt_per_million, price.completion_per_million, price.cached,
                        price.cache_write)  # fmt: skip
        return math.ceil(tokens * per_token + price.per_request * 1_000_000)


class PriceStore:
    """The dated prices in Redis, with a copy refreshed at most every REFRESH_S."""

    def __init__(self, redis: RedisClient, seed: dict[str, Price]) -> None:
        self._redis = redis
        self._seed = seed
        self._book = PriceBook([DatedPrice(m, 0, p) for m, p in seed.items()])
        self._fresh_until = 0.0

    def fresh_book(self) -> PriceBook | None:
        """The copy while it is fresh, without a coroutine (the hot path); else None."""
        return self._book if time.monotonic() < self._fresh_until else None

    async def book(self) -> PriceBook:
        if time.monotonic() >= self._fresh_until:
            await self._reload()
        return self._book

    async def _reload(self) -> None:
        if await self._redis.set(SEEDED, "1", nx=True):
            if self._seed:
                await self._redis.hset(
                    KEY, mapping={f"{m}|0": p.encode() for m, p in self._seed.items()}
                )
        raw = await self._redis.hgetall(KEY)
        prices = []
        for field, encoded in raw.items():
            model, _, when = field.rpartition("|")
            prices.append(DatedPrice(model, int(when), Price.decode(encoded)))
        self._book = PriceBook(prices)
        self._fresh_until = time.monotonic() + REFRESH_S

    async def set(self, dated: DatedPrice, now_ms: int) -> None:
        """Add a price (TooManyPrices past the bounds). A model keeps its newest
        MAX_PRICES_PER_MODEL prices: past that, the oldest of those that can no longer be
        in force (older than the one in force now; records are priced at arrival) are
        dropped, so the table — which every replica reads whole — stays small."""
        book = await self.book()  # seeded first, so the seed never overwrites a change
        times = book.versions(dated.model)
        if not times and len(book) >= MAX_PRICED_MODELS:
            raise TooManyPrices(f"at most {MAX_PRICED_MODELS} models and patterns have prices")
        times = sorted({*times, dated.effective_ms})
        excess = len(times) - MAX_PRICES_PER_MODEL
        drop: list[int] = []
        if excess > 0:
            current = max((t for t in times if t <= now_ms), default=None)
            past = [t for t in times if current is not None and t < current]
            if len(past) < excess:
                raise TooManyPrices(
                    f"{dated.model!r} has {MAX_PRICES_PER_MODEL} prices in force or to come; "
                    "delete one first"
                )
            drop = past[:excess]
        await self._redis.hset(KEY, f"{dated.model}|{dated.effective_ms}", dated.price.encode())
        if drop:
            await self._redis.hdel(KEY, *(f"{dated.model}|{t}" for t in drop))
        self._fresh_until = 0.0

    async def delete(self, model: str, effective_ms: int) -> bool:
        await self.book()
        removed = await self._redis.hdel(KEY, f"{model}|{effective_ms}")
        self._fresh_until = 0.0
        return bool(removed)
