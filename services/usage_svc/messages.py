"""Proto messages the usage RPCs build from the store's records."""

from __future__ import annotations

from agentplane.usage.v1 import usage_pb2
from services.usage_svc.usage_types import Counters


def totals_message(counters: Counters) -> usage_pb2.UsageTotals:
    return usage_pb2.UsageTotals(
        total_tokens=counters.prompt + counters.completion,
        prompt_tokens=counters.prompt,
        completion_tokens=counters.completion,
        request_count=counters.requests,
        total_cost_usd=counters.cost_micros / 1_000_000,
        total_cost_micros=counters.cost_micros,
        cached_prompt_tokens=counters.cached_prompt,
        reasoning_tokens=counters.reasoning,
        avg_latency_ms=round(counters.latency_sum_ms / counters.requests, 3)
        if counters.requests
        else 0.0,
        unpriced_request_count=counters.unpriced,
        cache_write_tokens=counters.cache_write,
        estimated_request_count=counters.estimated,
    )
