"""agentplane's Python SDK (hand-written; the generated protobuf code is beside it).

async with AgentplaneClient(token=...) as client:
    async with client.budget.guard(thread_id, tokens=2000, model="gpt-4o",
                                   agent_id=agent_id) as guard:
        reply = await call_the_model()
        guard.record(prompt_tokens=..., completion_tokens=...)
    client.usage.record(thread_id=..., agent_id=..., model=..., prompt_tokens=...)
"""

from agentplane.client._blocking import Client
from agentplane.client._client import (
    CHANNEL_OPTIONS,
    AgentplaneClient,
    BudgetExhausted,
    BudgetGuard,
    Retry,
    UsageRecorder,
)

__all__ = [
    "CHANNEL_OPTIONS",
    "AgentplaneClient",
    "BudgetExhausted",
    "BudgetGuard",
    "Client",
    "Retry",
    "UsageRecorder",
]
