"""The contract says what is required, and the services hold every caller to it: for every
RPC and every field its request marks `(google.api.field_behavior) = REQUIRED` — top level,
and inside the resource it carries — a request with every other required field set and
that one left out is INVALID_ARGUMENT naming exactly that field, from real servers, before
any handler runs (so nothing is written). An update naming an IMMUTABLE or OUTPUT_ONLY
field in its mask is refused on `update_mask`."""

from __future__ import annotations

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import duration_pb2, field_mask_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agentplane.usage.v1 import usage_pb2, usage_service_pb2
from services.common.validate import behaviors
from tests.security.test_security import EVERY_RPC


def _required(descriptor) -> list[FieldDescriptor]:
    return [f for f in descriptor.fields if field_behavior_pb2.REQUIRED in behaviors(f)]


def _fill_required(message) -> None:
    """Every REQUIRED field (and those of the messages it sets) given a plausible value."""
    for field in _required(message.DESCRIPTOR):
        _set(message, field)


def _set(message, field: FieldDescriptor) -> None:
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        repeated = field.label == FieldDescriptor.LABEL_REPEATED
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        target = getattr(message, field.name)
        name = field.message_type.full_name
        if name == "google.protobuf.Timestamp":
            target.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
        elif name == "google.protobuf.Duration":
            target.CopyFrom(duration_pb2.Duration(seconds=5))
        else:
            target.SetInParent()
            _fill_required(target)
    elif field.type == FieldDescriptor.TYPE_STRING:
        value = "gpt-4o" if field.name == "model" else "some-id"
        if field.name == "url":
            value = "https://example.com/hook"
        getattr(message, field.name).append(value) if repeated else setattr(
            message, field.name, value
        )
    elif field.type == FieldDescriptor.TYPE_ENUM:
        setattr(message, field.name, 1)
    else:
        setattr(message, field.name, 1)


CASES = [
    (backend, method, path)
    for backend, method in EVERY_RPC
    for path in [f.name for f in _required(method.input_type)]
    + [
        f"{outer.name}.{inner.name}"
        for outer in method.input_type.fields
        if outer.type == FieldDescriptor.TYPE_MESSAGE
        and "update_mask" not in method.input_type.fields_by_name
        and not outer.message_type.full_name.startswith("google.")
        and field_behavior_pb2.REQUIRED in behaviors(outer)
        for inner in _required(outer.message_type)
    ]
]


def test_every_service_has_required_fields_to_check() -> None:
    assert len(CASES) >= 60  # what the protos annotate today; a lost annotation shows here
    services = {m.containing_service.name for _, m, _ in CASES}
    assert services == {"AgentService", "ThreadService", "UsageService"}


@pytest.mark.parametrize(
    ("backend", "method", "path"), CASES, ids=[f"{m.name}.{p}" for _, m, p in CASES]
)
async def test_a_request_without_a_required_field_is_refused_naming_it(
    cluster, backend, method, path
) -> None:
    if cluster.redis_cluster:
        pytest.skip("the chassis's check, before any Redis call: standalone is enough")
    request = message_factory.GetMessageClass(method.input_type)()
    _fill_required(request)
    outer, _, inner = path.partition(".")
    if inner:
        getattr(request, outer).ClearField(inner)
    else:
        request.ClearField(outer)
    channel = cluster.channels[("agent", "thread", "usage").index(backend)]
    rpc = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = message_factory.GetMessageClass(method.output_type)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method.server_streaming:
            call = channel.unary_stream(rpc, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response_cls.FromString)(request, timeout=5)  # fmt: skip
            await call.read()
        else:
            await channel.unary_unary(rpc, request_serializer=type(request).SerializeToString,
                                      response_deserializer=response_cls.FromString)(request, timeout=5)  # fmt: skip
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
    status = rpc_status.from_call(error)
    assert status is not None
    violations = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations += [(v.field, v.description) for v in bad.field_violations]
    assert violations == [(path, "is required")]


async def test_a_blank_string_is_not_a_value(cluster) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cluster.usage.GetModelUsage(usage_service_pb2.GetModelUsageRequest(model="   "))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model: is required" in (caught.value.details() or "")


@pytest.mark.parametrize("path", ["period", "scope", "time_zone", "budget_id", "used_tokens"])
async def test_an_update_cannot_name_a_fixed_field(cluster, path) -> None:
    request = usage_service_pb2.UpdateBudgetRequest(
        project_id="p", budget_id="b", budget=usage_pb2.Budget(),
        update_mask=field_mask_pb2.FieldMask(paths=[path]),
    )  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cluster.usage.UpdateBudget(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"invalid update_mask: {path} is fixed once created"


def test_no_handler_checks_presence_by_hand() -> None:
    """The one place that says "is required" is the chassis; what is left in handlers is
    conditional (required *with* another field, or for one kind of caller), which
    field_behavior cannot express."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "services"
    conditional = ("is required with", "is required for", "is required to", "is required when",
                   "is required)", "max_in_flight is required")  # fmt: skip
    found = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "is required" in line and not any(c in line for c in conditional):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert [f for f in found if not f.startswith("common/validate.py")] == []
