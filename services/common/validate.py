"""Checks every request gets before its handler runs, whatever the RPC.

First what the contract says is required: every field annotated
`(google.api.field_behavior) = REQUIRED` in the protos must be set (a non-blank string, a
non-zero number or enum, a present message, a non-empty list), in the request and in the
messages it carries — in an update (a request with `update_mask`), the resource's required
fields only when the mask names them. Each is INVALID_ARGUMENT "is required" naming the
field; handlers check no presence themselves, only what a field's value must look like.
`RecordUsageBatch` checks each of its records with `require_fields` (each is answered on
its own).

Then what protobuf accepts but no handler should see:enum numbers the proto does not
define (proto3 enums are open), Durations and Timestamps outside their documented ranges
or with mixed signs, NaN and ±Infinity in doubles and inside Struct values (which then
cannot even be written out as JSON), and strings longer than any field takes
(MAX_STRING_LENGTH; handlers hold each field to its own, smaller limit). Each is
INVALID_ARGUMENT naming the field.

The walk is planned once per message type: a type with none of these fields (most
hot-path requests) costs one dictionary lookup.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common import errors
from services.common.limits import MAX_STRING_LENGTH

DURATION = "google.protobuf.Duration"
TIMESTAMP = "google.protobuf.Timestamp"
STRUCT = "google.protobuf.Struct"
VALUE = "google.protobuf.Value"
LIST_VALUE = "google.protobuf.ListValue"
MAX_DURATION_SECONDS = 315_576_000_000  # ±10,000 years, as the protobuf docs define
MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)

SCALARS = ("enum", "float", "string")  # checked whether set or not (proto3: no presence)
# What to check in a field: "enum", "float", or a message kind.
Plan = tuple[tuple[FieldDescriptor, str, bool], ...]


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]


@functools.cache
def _plan(descriptor: Descriptor) -> Plan:
    steps: list[tuple[FieldDescriptor, str, bool]] = []
    for field in descriptor.fields:
        kind = ""
        if field.type == FieldDescriptor.TYPE_ENUM:
            kind = "enum"
        elif field.type == FieldDescriptor.TYPE_STRING:
            kind = "string"
        elif field.type in FLOATS:
            kind = "float"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            name = field.message_type.full_name
            if field.message_type.GetOptions().map_entry:
                value = field.message_type.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_MESSAGE and _needs(value.message_type):
                    kind = "map"
            elif name in (DURATION, TIMESTAMP, STRUCT, VALUE, LIST_VALUE):
                kind = name
            elif _needs(field.message_type):
                kind = "message"
        if kind:
            steps.append((field, kind, _repeated(field)))
    return tuple(steps)


def _needs(descriptor: Descriptor) -> bool:
    if descriptor.full_name in (DURATION, TIMESTAMP, STRUCT, VALUE, LIST_VALUE):
        return True
    return bool(_plan(descriptor))


def check_request(message: Message) -> None:
    """INVALID_ARGUMENT naming the first field that protobuf accepted but the API does not.
    Agentplane's own messages only: a foreign protocol served beside them (OTLP, whose
    values nest without end and whose strings are anything a program logged) is checked
    by its handler."""
    if not message.DESCRIPTOR.full_name.startswith("agentplane."):
        return
    require_fields(message)
    _check(message, "")


def behaviors(field: FieldDescriptor) -> frozenset[int]:
    """The field's `google.api.field_behavior` annotations (REQUIRED, OUTPUT_ONLY, ...)."""
    return frozenset(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def require_fields(message: Message, prefix: str = "") -> None:
    """INVALID_ARGUMENT naming the first REQUIRED field that is not set, or the update mask
    when it names a field that is IMMUTABLE or OUTPUT_ONLY (see the module)."""
    if "update_mask" not in message.DESCRIPTOR.fields_by_name:
        _require(message, prefix, None, top=True)
        return
    paths = frozenset(getattr(message, "update_mask").paths)  # noqa: B009 (typed as Message)
    for field in _resources(message.DESCRIPTOR):
        for path in sorted(paths):
            named = field.message_type.fields_by_name.get(path)
            if named is not None and behaviors(named) & FIXED:
                raise errors.invalid_argument(
                    prefix + "update_mask", f"{path} is fixed once created"
                )
    _require(message, prefix, paths, top=True)


FIXED = frozenset({field_behavior_pb2.IMMUTABLE, field_behavior_pb2.OUTPUT_ONLY})


@functools.cache
def _resources(descriptor: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The resource an update request carries: its singular message fields but the mask."""
    return tuple(
        f for f in descriptor.fields
        if f.type == FieldDescriptor.TYPE_MESSAGE and not _repeated(f)
        and not f.message_type.full_name.startswith("google.")
    )  # fmt: skip


def _require(message: Message, prefix: str, only: frozenset[str] | None, top: bool) -> None:
    for field, required, inside in _required(message.DESCRIPTOR):
        path = prefix + field.name
        present = _present(message, field)
        if required and not present and (top or only is None or field.name in only):
            raise errors.invalid_argument(path, "is required")
        if inside and present:
            _require(getattr(message, field.name), path + ".", only, top=False)


@functools.cache
def _required(descriptor: Descriptor) -> tuple[tuple[FieldDescriptor, bool, bool], ...]:
    """(field, whether it is REQUIRED, whether to look inside it) for the fields that need
    either; planned once per message type."""
    steps = []
    for field in descriptor.fields:
        required = field_behavior_pb2.REQUIRED in behaviors(field)
        inside = (
            field.type == FieldDescriptor.TYPE_MESSAGE
            and not _repeated(field)
            and not field.message_type.full_name.startswith("google.")
            and bool(_required(field.message_type))
        )
        if required or inside:
            steps.append((field, required, inside))
    return tuple(steps)


def _present(message: Message, field: FieldDescriptor) -> bool:
    value = getattr(message, field.name)
    if _repeated(field):
        return len(value) > 0
    if field.type == FieldDescriptor.TYPE_MESSAGE or field.has_presence:
        return message.HasField(field.name)
    if field.type == FieldDescriptor.TYPE_STRING:
        return bool(value.strip())
    return bool(value)


def _check(message: Message, prefix: str) -> None:
    for field, kind, repeated in _plan(message.DESCRIPTOR):
        path = prefix + field.name
        value = getattr(message, field.name)
        if kind == "map":
            for key, item in value.items():
                _check(item, f"{path}.{key}.")
            continue
        if repeated:
            if kind not in SCALARS and not len(value):
                continue
            for index, item in enumerate(value):
                _check_one(field, kind, item, f"{path}[{index}]")
            continue
        if kind not in SCALARS and not message.HasField(field.name):
            continue
        _check_one(field, kind, value, path)


def _check_enum(field: FieldDescriptor, value: Any, path: str) -> None:
    if value not in field.enum_type.values_by_number:
        raise errors.invalid_argument(path, f"{value} is not a {field.enum_type.name} value")


def _check_string(_field: FieldDescriptor, value: Any, path: str) -> None:
    if len(value) > MAX_STRING_LENGTH:
        raise errors.invalid_argument(
            path, f"is {len(value)} characters long; at most {MAX_STRING_LENGTH} are accepted"
        )


def _check_float(_field: FieldDescriptor, value: Any, path: str) -> None:
    if not math.isfinite(value):
        raise errors.invalid_argument(path, "must be a finite number")


def _check_duration(_field: FieldDescriptor, value: Any, path: str) -> None:
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > MAX_DURATION_SECONDS
        or abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise errors.invalid_argument(path, "is not a valid Duration")


def _check_timestamp(_field: FieldDescriptor, value: Any, path: str) -> None:
    if (
        not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        or not 0 <= value.nanos <= 999_999_999
    ):
        raise errors.invalid_argument(path, "is not a valid Timestamp")


def _check_struct(_field: FieldDescriptor, value: Any, path: str) -> None:
    for key, item in value.fields.items():
        _check_value(item, f"{path}.{key}")


def _check_list_value(_field: FieldDescriptor, value: Any, path: str) -> None:
    for index, item in enumerate(value.values):
        _check_value(item, f"{path}[{index}]")


def _check_message(_field: FieldDescriptor, value: Any, path: str) -> None:
    _check(value, path + ".")


_CHECKS = {
    "enum": _check_enum,
    "string": _check_string,
    "float": _check_float,
    DURATION: _check_duration,
    TIMESTAMP: _check_timestamp,
    STRUCT: _check_struct,
    VALUE: lambda _field, value, path: _check_value(value, path),
    LIST_VALUE: _check_list_value,
    "message": _check_message,
}


def _check_one(field: FieldDescriptor, kind: str, value: Any, path: str) -> None:
    _CHECKS[kind](field, value, path)


def _check_value(value: Any, path: str) -> None:
    """A google.protobuf.Value: numbers must be finite (JSON has no NaN or Infinity)."""
    which = value.WhichOneof("kind")
    if which == "number_value":
        if not math.isfinite(value.number_value):
            raise errors.invalid_argument(path, "must be a finite number (JSON has no NaN)")
    elif which == "struct_value":
        for key, item in value.struct_value.fields.items():
            _check_value(item, f"{path}.{key}")
    elif which == "list_value":
        for index, item in enumerate(value.list_value.values):
            _check_value(item, f"{path}[{index}]")
