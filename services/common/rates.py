"""Rate limits as configured (RATE_LIMITS): per method, with a burst. Parsed here, by
the settings (to refuse a bad value at start) and used by the limiter in auth.py."""

from __future__ import annotations

from dataclasses import dataclass

from services.common import methods


@dataclass(frozen=True, slots=True)
class Rate:
    per_minute: int
    burst: int


def parse_rate_limits(text: str) -> dict[str, Rate]:
    """RATE_LIMITS: "SpawnAgent=20/min,default_read=60/min,RecordUsage=600/min:100"
    (name=count/min, optionally :burst; the burst defaults to a minute's worth)."""
    limits = {
        "SpawnAgent": Rate(20, 20),
        "default_read": Rate(60, 60),
        "default_write": Rate(30, 30),
    }
    for hot in filter(methods.is_hot, methods.KINDS):
        limits[hot] = Rate(600, 600)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        count, _, rest = spec.partition("/")
        unit, _, burst = rest.partition(":")
        if not (name and count.isdigit() and int(count) > 0 and unit == "min"):
            raise ValueError(f"RATE_LIMITS entry {item!r} must look like Method=20/min[:burst]")
        per_minute = int(count)
        limits[name] = Rate(per_minute, int(burst) if burst.isdigit() else per_minute)
    return limits
