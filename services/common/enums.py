"""Proto enum values by their short names: AgentStatus PAUSED ⇄ AGENT_STATUS_PAUSED.

The prefix is the enum's name in UPPER_SNAKE_CASE (AIP-126), so every enum of the protos
is handled alike; storage, logs and REST use the short names."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import EnumDescriptor


def prefix(enum: EnumDescriptor) -> str:
    """AgentStatus → "AGENT_STATUS_"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def short_name(enum: Any, value: int) -> str:
    """The short name of a value of `enum` (a generated enum wrapper): 4 → "PAUSED"."""
    return str(enum.Name(value)).removeprefix(prefix(enum.DESCRIPTOR))


def value_of(enum: Any, short: str) -> Any:
    """The value of a short name: "PAUSED" → 4, typed as the enum's own ValueType
    (ValueError for an unknown name)."""
    return enum.Value(prefix(enum.DESCRIPTOR) + short)
