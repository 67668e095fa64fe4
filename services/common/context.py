"""The current call's context (credentials, deadline, method), for forwarding to peers.

The server interceptor sets it for each RPC; the client interceptor reads it, so any peer
call made while serving an RPC carries the caller's deadline, trace context and token.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.auth import Principal


@dataclass(frozen=True, slots=True)
class CallContext:
    method: str
    peer: str
    authorization: str | None
    deadline: float | None  # time.monotonic() instant, None for no deadline
    principal: Principal | None = None
    internal: bool = False  # made by a service on a caller's behalf (auth.internal_proof)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


current_call: ContextVar[CallContext | None] = ContextVar("agentplane_call", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served."""
    call = current_call.get()
    if call is None or call.principal is None:
        raise RuntimeError("no authenticated call in progress")
    return call.principal


def current_call_is_internal() -> bool:
    """Whether the RPC being served was made by another service on its caller's behalf."""
    call = current_call.get()
    return call is not None and call.internal
