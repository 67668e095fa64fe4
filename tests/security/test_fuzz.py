"""Malformed requests, generated from the request descriptors, never crash a service: no
INTERNAL/UNKNOWN, never a stack trace in a message, and every stream answers or ends."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.test_security import EVERY_RPC

pytestmark = pytest.mark.slow  # fault injection, fuzzing, manifests: left out of test-fast

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["-", "|", "..", "a|b", "\x00", "ø" * 300, "x" * 5000, "{", "apk_", "%s"]),
)
INTS = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 2**31 - 1]))
INT64S = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 10**12, 2**62]))
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


WELL_KNOWN_FILLED = ("Struct", "Duration", "FieldMask", "Timestamp")


def _scalar_strategy(field):
    return {
        FieldDescriptor.TYPE_STRING: TEXT,
        FieldDescriptor.TYPE_BOOL: st.booleans(),
        FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
        FieldDescriptor.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True),
        FieldDescriptor.TYPE_ENUM: st.integers(-2, 12),
        FieldDescriptor.TYPE_INT64: INT64S,
    }.get(field.type, INTS)


def _fill_well_known(target, draw) -> None:
    name = target.DESCRIPTOR.name
    if name == "Struct":
        value = draw(st.one_of(TEXT, st.floats(allow_nan=False), st.booleans()))
        target.update({draw(TEXT)[:20] or "k": value})
    elif name == "Duration":
        target.seconds = draw(st.integers(-(10**6), 10**6))
    elif name == "FieldMask":
        target.paths.extend(draw(st.lists(TEXT, max_size=3)))
    elif name == "Timestamp":
        target.seconds = draw(st.integers(0, 2**33))


def _fill_message_field(message, field, repeated: bool, draw, depth: int) -> None:
    kind = field.message_type
    if depth > 2 or kind.GetOptions().map_entry:
        return
    if kind.full_name.startswith("google.protobuf.") and kind.name not in WELL_KNOWN_FILLED:
        return
    target = getattr(message, field.name).add() if repeated else getattr(message, field.name)
    if kind.name in WELL_KNOWN_FILLED:
        _fill_well_known(target, draw)
    else:
        _fill(target, draw, depth + 1)


def _fill(message, draw, depth: int = 0) -> None:
    for field in message.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        repeated = getattr(field, "is_repeated", None)
        repeated = field.label == FieldDescriptor.LABEL_REPEATED if repeated is None else repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill_message_field(message, field, repeated, draw, depth)
        elif repeated:
            strategy = _scalar_strategy(field)
            getattr(message, field.name).extend(draw(st.lists(strategy, max_size=3)))
        else:
            setattr(message, field.name, draw(_scalar_strategy(field)))


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_random_requests_never_break_a_service(cluster, data) -> None:
    if cluster.redis_cluster:
        pytest.skip("standalone is enough here")
    for backend, method in EVERY_RPC:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        _fill(request, data.draw)
        channel = cluster.channels[("agent", "thread", "usage").index(backend)]
        path = f"/{method.containing_service.full_name}/{method.name}"
        if method.name in ("ResetUsage",):
            continue  # valid and destructive: nothing malformed to send
        try:
            if method.server_streaming:
                call = channel.unary_stream(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )(request, timeout=1.5)
                await call.read()
                call.cancel()
            else:
                await channel.unary_unary(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() not in BROKEN, (method.full_name, request, exc.details())
            assert "Traceback" not in (exc.details() or ""), exc.details()
