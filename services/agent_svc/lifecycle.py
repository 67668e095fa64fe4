"""The agent lifecycle (docs/api.md §2.1): which moves are allowed, and what each move implies."""

from __future__ import annotations

from agentplane.agent.v1 import agent_pb2
from services.common import enums, errors

IDLE, WORKING, WAITING, PAUSED, TERMINATED = "IDLE", "WORKING", "WAITING", "PAUSED", "TERMINATED"

MOVES: dict[str, frozenset[str]] = {
    IDLE: frozenset({WORKING, PAUSED, TERMINATED}),
    WORKING: frozenset({IDLE, WAITING, PAUSED, TERMINATED}),
    WAITING: frozenset({IDLE, WORKING, PAUSED, TERMINATED}),
    PAUSED: frozenset({IDLE, TERMINATED}),
    TERMINATED: frozenset(),
}


def allowed_from(target: str) -> tuple[str, ...]:
    """The states from which `target` may be reached."""
    return tuple(sorted(state for state, targets in MOVES.items() if target in targets))


def status_name(value: int) -> str:
    """Short name of an AgentStatus value ("PAUSED"); INVALID_ARGUMENT for UNSPECIFIED/unknown."""
    if value == agent_pb2.AGENT_STATUS_UNSPECIFIED or value not in agent_pb2.AgentStatus.values():
        raise errors.invalid_argument("status", f"{value} is not an agent status")
    return enums.short_name(agent_pb2.AgentStatus, value)


def status_value(name: str) -> agent_pb2.AgentStatus.ValueType:
    return enums.value_of(agent_pb2.AgentStatus, name)


def refused(current: str, target: str) -> errors.ServiceError:
    """FAILED_PRECONDITION naming both states."""
    if current == TERMINATED:
        message = (
            f"agent is TERMINATED; it cannot move to {target}"
            if target
            else ("agent is TERMINATED and can no longer change")
        )
    else:
        message = f"cannot move an agent from {current} to {target}"
    return errors.failed_precondition(
        message, "INVALID_STATUS_TRANSITION", from_status=current, to_status=target
    )


def effects(target: str, now_ms: int) -> tuple[list[str], dict[str, str]]:
    """Fields a move to `target` clears and sets, beyond the status itself."""
    if target == TERMINATED:
        return ["current_task", "session_id"], {"terminate_ms": str(now_ms)}
    if target == IDLE:
        return ["current_task"], {}
    return [], {}
