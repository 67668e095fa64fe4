"""Every RPC, declared once: whether it only reads, and its rate class.

A read is rate-limited as `default_read` and let through when the rate limiter's Redis
cannot answer; a write as `default_write` and refused then (a limiter must not be a way
around itself for writes). The per-LLM-call paths have a class of their own (`hot`,
600/min by default). A test checks that every RPC in the protos is listed here.
"""

from __future__ import annotations

READ, WRITE, HOT_READ, HOT_WRITE = "read", "write", "hot read", "hot write"

KINDS: dict[str, str] = {
    # AgentService
    "CreateProject": WRITE, "GetProject": READ, "ListProjects": READ,
    "CreateAgentType": WRITE, "GetAgentType": READ, "ListAgentTypes": READ,
    "UpdateAgentType": WRITE,
    "SpawnAgent": WRITE, "GetAgent": READ, "ListAgents": READ, "UpdateAgent": WRITE,
    "PauseAgent": WRITE, "ResumeAgent": WRITE, "TerminateAgent": WRITE,
    "StartTask": WRITE, "CompleteTask": WRITE, "GetAgentSchema": READ,
    "GetAgentMetrics": READ, "GetProjectAgentMetrics": READ, "GetOverview": READ,
    "WatchAgents": READ,
    "CreateApiKey": WRITE, "ListApiKeys": READ, "RevokeApiKey": WRITE, "WhoAmI": HOT_READ,
    # ThreadService
    "CreateThread": WRITE, "GetThread": READ, "ListThreads": READ, "ListMessages": READ,
    "PostMessage": HOT_WRITE, "InjectMessage": WRITE, "KillThread": WRITE,
    "CompleteThread": WRITE, "ReceiveMessages": HOT_READ, "AckMessages": HOT_WRITE,
    "WatchThread": READ,
    # UsageService
    "RecordUsage": HOT_WRITE, "RecordUsageBatch": HOT_WRITE, "ReserveBudget": HOT_WRITE,
    "ReleaseReservation": HOT_WRITE, "SetThreadBudget": WRITE, "CloseThreadBudget": WRITE,
    "GetThreadBudget": READ, "ListThreadBudgets": READ, "GetUsageOverview": READ,
    "GetAgentUsage": READ, "BatchGetAgentUsage": READ, "GetModelUsage": READ, "ResetUsage": WRITE,
    "BatchGetThreadBudgets": READ,
    "CreateBudget": WRITE, "GetBudget": READ, "ListBudgets": READ, "UpdateBudget": WRITE,
    "DeleteBudget": WRITE, "ResetBudget": WRITE, "ListBudgetPeriods": READ,
    "WatchBudgetAlerts": READ, "CreateWebhook": WRITE, "ListWebhooks": READ,
    "DeleteWebhook": WRITE, "ListWebhookDeliveries": READ, "RotateWebhookSecret": WRITE,
    "GetUsageTimeSeries": READ, "ExportUsage": READ, "SetModelPrice": WRITE,
    "ListModelPrices": READ, "DeleteModelPrice": WRITE,
    "LogModelCall": HOT_WRITE, "ListModelCalls": READ,
    # opentelemetry.proto.collector.trace.v1.TraceService (on the usage service)
    "Export": HOT_WRITE,
}  # fmt: skip


def is_read(method_name: str) -> bool:
    """Unknown methods count as writes: the safe side for a limiter."""
    return KINDS.get(method_name, WRITE) in (READ, HOT_READ)


def is_hot(method_name: str) -> bool:
    return KINDS.get(method_name) in (HOT_READ, HOT_WRITE)
