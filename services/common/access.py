"""What a principal may do, judged from the principal alone (no storage, no peers).

Whether a caller may see a project or an agent is the agent service's to say: the other
services ask it through services.common.peers.AgentClient."""

from __future__ import annotations

from services.common import errors
from services.common.auth import AGENT, Principal
from services.common.context import current_principal


def require_manager(principal: Principal | None = None) -> Principal:
    principal = principal or current_principal()
    if principal.role == AGENT:
        raise errors.permission_denied("an agent token cannot do this", "AGENT_TOKEN")
    return principal


def require_superuser(what: str) -> Principal:
    principal = current_principal()
    if not principal.is_superuser:
        raise errors.permission_denied(f"{what} is for the superuser only", "SUPERUSER_ONLY")
    return principal


def require_self(agent_id: str, field: str) -> None:
    """An agent token acts only as its agent."""
    principal = current_principal()
    if principal.role == AGENT and agent_id != principal.subject:
        raise errors.permission_denied(
            f"an agent token acts only as its own agent, not as {field}={agent_id!r}", "NOT_SELF"
        )
