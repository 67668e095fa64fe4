"""Who may see and change what, in one place (docs/security.md).

- the superuser: everything;
- an owner: the projects whose `owner` is their principal name, and everything in them;
  anything else answers NOT_FOUND, as though it did not exist. An owner key made with a
  `project_id` is limited to that one project: it sees no other, creates no project, and
  mints only keys limited to that project (a key is never wider than the key that made it);
- an agent: reads within its own project, its own bookkeeping, and no management at all.
Cross-project listing (`-`), the overview, and agent types' changes are superuser-only.

The rules are judged from the principal and the project's owner alone (no storage, no
peers). The agent service, which keeps projects, applies them; the other services ask it
through services.common.peers.AgentClient, with the caller's own credentials."""

from __future__ import annotations

from services.common import errors
from services.common.auth import AGENT, OWNER, Principal
from services.common.context import current_principal


def can_see_project(principal: Principal, project_id: str, owner: str) -> bool:
    """Whether `principal` may see the project `project_id` owned by `owner`."""
    if principal.is_superuser:
        return True
    if principal.role == OWNER:
        limited = principal.project_id and principal.project_id != project_id
        return owner == principal.subject and not limited
    return principal.role == AGENT and project_id == principal.project_id


def require_manager(principal: Principal | None = None) -> Principal:
    """Owners and the superuser manage; agent tokens cannot."""
    principal = principal or current_principal()
    if principal.role == AGENT:
        raise errors.permission_denied(
            "an agent token cannot manage agents, projects, threads or budgets", "AGENT_TOKEN"
        )
    return principal


def require_manager_or_self(agent_id: str) -> None:
    """Managers move any agent; an agent token moves only its own agent (its WORKING/IDLE
    bookkeeping: StartTask, CompleteTask)."""
    principal = current_principal()
    if principal.role == AGENT and principal.subject != agent_id:
        raise errors.permission_denied(
            f"an agent token moves only its own agent, not {agent_id!r}", "NOT_SELF"
        )


def require_superuser(what: str, principal: Principal | None = None) -> Principal:
    principal = principal or current_principal()
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


def require_unlimited(principal: Principal, what: str) -> None:
    """A key limited to one project cannot act beyond it."""
    if principal.project_id and principal.role == OWNER:
        raise errors.permission_denied(
            f"this key is limited to project {principal.project_id!r}: it cannot {what}",
            "PROJECT_LIMITED_KEY",
        )


def project_limit_of_new_key(principal: Principal, requested: str) -> str:
    """The project a new OWNER key is limited to: what was asked, but never wider than the
    key that makes it."""
    if principal.role == OWNER and principal.project_id and requested != principal.project_id:
        if requested:
            raise errors.permission_denied(
                f"this key is limited to project {principal.project_id!r}: it can mint keys "
                f"for that project only, not {requested!r}",
                "PROJECT_LIMITED_KEY",
            )
        return principal.project_id
    return requested


def owner_of_new_project(principal: Principal, requested: str) -> str:
    """An owner's projects are theirs; the superuser may name any owner."""
    require_manager(principal)
    require_unlimited(principal, "create projects")
    if principal.is_superuser:
        return requested or principal.subject
    return principal.subject
