"""The price table: model → USD per million prompt and completion tokens.

Defaults for common models ship in prices.json beside this file; PRICE_TABLE_PATH names
a file of the same format whose entries replace or add to them. Costs are integers in
micro-USD: USD per million tokens is exactly micro-USD per token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import SettingsError

DEFAULTS = Path(__file__).with_name("prices.json")


class PriceTableError(SettingsError):
    """The price file is unreadable or malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class Price:
    prompt_per_million: float
    completion_per_million: float


def _read(path: Path) -> dict[str, Price]:
    try:
        models = json.loads(path.read_text())["models"]
        return {
            str(name): Price(float(p["prompt"]), float(p["completion"]))
            for name, p in models.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PriceTableError(f"price table {path}: {exc}") from None


class PriceTable:
    def __init__(self, prices: dict[str, Price]) -> None:
        for model, price in prices.items():
            if price.prompt_per_million < 0 or price.completion_per_million < 0:
                raise PriceTableError(f"price of {model!r} is negative")
        self._prices = prices

    @classmethod
    def load(cls, override: str = "") -> PriceTable:
        prices = _read(DEFAULTS)
        if override:
            prices.update(_read(Path(override)))
        return cls(prices)

    def cost_micros(self, model: str, prompt_tokens: int, completion_tokens: int) -> int | None:
        """Cost in micro-USD, or None when the model has no price."""
        price = self._prices.get(model)
        if price is None:
            return None
        return round(
            prompt_tokens * price.prompt_per_million
            + completion_tokens * price.completion_per_million
        )

    def estimate_micros(self, model: str, tokens: int) -> int:
        """What a cost-limited budget holds for a reservation: the tokens priced at the
        model's higher per-token price, rounded up; 0 for an unknown (or no) model."""
        price = self._prices.get(model)
        if price is None:
            return 0
        return math.ceil(tokens * max(price.prompt_per_million, price.completion_per_million))
