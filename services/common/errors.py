"""Domain errors that carry their gRPC code and google.rpc details.

Servicers and stores raise these; the chassis interceptor turns them into a status with
`ErrorInfo` (reason, domain) and, where they apply, `BadRequest`, `QuotaFailure` and
`RetryInfo` details. Anything else is INTERNAL with nothing of it shown to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "agentplane.dev"
MAX_ECHO = 500  # characters of any one text an error carries (message, description, value)


def _short(text: str) -> str:
    """At most MAX_ECHO characters of `text`: an error never carries a caller's whole input
    back (a long value would not fit in gRPC's trailers, which turns the error into
    RESOURCE_EXHAUSTED "metadata size exceeds limit")."""
    if len(text) <= MAX_ECHO:
        return text
    return f"{text[:MAX_ECHO]}… ({len(text)} characters)"


@dataclass
class ServiceError(Exception):
    """Base of every error a caller may see."""

    message: str
    reason: str = "ERROR"
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.message = _short(self.message)
        self.field_violations = [(_short(f), _short(d)) for f, d in self.field_violations]
        self.quota_violations = [(_short(s), _short(d)) for s, d in self.quota_violations]
        self.metadata = {k: _short(v) for k, v in self.metadata.items()}
        super().__init__(self.message)

    def to_status(self) -> grpc.Status:
        """The grpc.Status (with details in `grpc-status-details-bin`) for this error."""
        return rpc_status.to_status(self.to_proto())

    def to_proto(self) -> status_pb2.Status:
        """The error as a google.rpc.Status (batch results, the gateway's envelope)."""
        details = [
            error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        ]
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        if self.quota_violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        packed = []
        for detail in details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


def invalid_argument(
    field_name: str, description: str, reason: str = "INVALID_ARGUMENT"
) -> ServiceError:
    """INVALID_ARGUMENT naming the wrong field."""
    return ServiceError(
        f"invalid {field_name}: {description}",
        reason=reason,
        code=grpc.StatusCode.INVALID_ARGUMENT,
        field_violations=[(field_name, description)],
    )


def not_found(kind: str, resource_id: str) -> ServiceError:
    """NOT_FOUND with reason `<KIND>_NOT_FOUND`."""
    return ServiceError(
        f"{kind.replace('_', ' ')} {resource_id!r} not found",
        reason=f"{kind.upper()}_NOT_FOUND",
        code=grpc.StatusCode.NOT_FOUND,
        metadata={kind.lower(): resource_id},
    )


def already_exists(kind: str, resource_id: str, message: str = "") -> ServiceError:
    return ServiceError(
        message or f"{kind.replace('_', ' ')} {resource_id!r} already exists",
        reason=f"{kind.upper()}_ALREADY_EXISTS",
        code=grpc.StatusCode.ALREADY_EXISTS,
        metadata={kind.lower(): resource_id},
    )


def failed_precondition(message: str, reason: str, **metadata: str) -> ServiceError:
    return ServiceError(
        message, reason=reason, code=grpc.StatusCode.FAILED_PRECONDITION, metadata=metadata
    )


def permission_denied(message: str, reason: str = "PERMISSION_DENIED") -> ServiceError:
    return ServiceError(message, reason=reason, code=grpc.StatusCode.PERMISSION_DENIED)


def unavailable(message: str, reason: str = "BACKEND_UNAVAILABLE") -> ServiceError:
    return ServiceError(message, reason=reason, code=grpc.StatusCode.UNAVAILABLE, retry_after_s=1.0)


def resource_exhausted(
    message: str,
    reason: str,
    subject: str = "",
    retry_after_s: float | None = None,
    violations: list[tuple[str, str]] | None = None,
) -> ServiceError:
    """RESOURCE_EXHAUSTED with a QuotaFailure: one violation (`subject`, the message), or
    the (subject, description) pairs given."""
    return ServiceError(
        message,
        reason=reason,
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        quota_violations=violations or [(subject, message)],
        retry_after_s=retry_after_s,
    )


def details_of(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[object]:
    """Decode the google.rpc details of a received error (for clients and tests)."""
    status = rpc_status.from_call(error)
    if status is None:
        return []
    decoded: list[object] = []
    for detail in status.details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                decoded.append(message)
    return decoded


__all__ = [
    "DOMAIN",
    "ServiceError",
    "already_exists",
    "details_of",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "permission_denied",
    "resource_exhausted",
    "unavailable",
]
