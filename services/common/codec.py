"""JSON ⇄ protobuf with the REST rules of docs/api.md §3.

Proto field names; every field present (zeros, empty lists, null for unset messages);
64-bit integers as JSON numbers; enums as short lowercase names ("paused"), with the
short, the upper-case and the full name ("AGENT_STATUS_PAUSED") all accepted on input.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from services.common import enums, errors

WELL_KNOWN_AS_JSON = {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.FieldMask",
    "google.rpc.Status",
}
# Message types a query parameter may carry, written as their JSON string.
QUERY_MESSAGES = {
    "google.protobuf.FieldMask", "google.protobuf.Timestamp", "google.protobuf.Duration",
}  # fmt: skip
INTEGER_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip
FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


def enum_short(enum: EnumDescriptor, number: int) -> str | int:
    value = enum.values_by_number.get(number)
    if value is None:
        return number
    return value.name.removeprefix(enums.prefix(enum)).lower()


def enum_full(enum: EnumDescriptor, given: Any, path: str) -> str | int:
    """The full value name for any accepted spelling; 400 naming the field otherwise."""
    if isinstance(given, int) and not isinstance(given, bool) and given in enum.values_by_number:
        return given
    if isinstance(given, str):
        for candidate in (given, given.upper(), enums.prefix(enum) + given.upper()):
            if candidate in enum.values_by_name:
                return candidate
    allowed = ", ".join(enum_short(enum, v.number) for v in enum.values)  # type: ignore[misc]
    raise errors.invalid_argument(path, f"{given!r} is not one of: {allowed}")


def is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before
    if flag is not None:
        return bool(flag)
    return field.label == FieldDescriptor.LABEL_REPEATED  # type: ignore[attr-defined]


def is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def to_json(message: Message) -> dict[str, Any]:
    """A message as JSON with every field present."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v) for k, v in value.items()}
        elif is_repeated(field):
            out[field.name] = [_value(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value(field, value)
    return out


_DIRECT = {
    # The common well-known types, without json_format's generic (and slow) walk.
    "google.protobuf.Timestamp": lambda v: timestamp_json(v.seconds, v.nanos),
    "google.protobuf.Duration": lambda v: v.ToJsonString(),
    "google.protobuf.FieldMask": lambda v: ",".join(v.paths),
}


def timestamp_json(seconds: int, nanos: int) -> str:
    """RFC 3339 as protobuf's Timestamp.ToJsonString writes it (0, 3, 6 or 9 fraction
    digits), without its datetime arithmetic."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if year_digits := text.find("-"):  # strftime leaves years before 1000 unpadded
        text = text.rjust(len(text) + 4 - year_digits, "0")
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{text}.{nanos // 1_000:06d}Z"
    return f"{text}.{nanos:09d}Z"


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        direct = _DIRECT.get(field.message_type.full_name)
        if direct is not None:
            return direct(value)
        if (
            field.message_type.full_name in WELL_KNOWN_AS_JSON
            or field.message_type.full_name.startswith("google.")
        ):
            return json_format.MessageToDict(value, preserving_proto_field_name=True)
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_short(field.enum_type, value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


def normalize(data: Any, descriptor: Descriptor, path: str = "") -> Any:
    """Input JSON with enum spellings made canonical, checked against the message shape."""
    if not isinstance(data, dict):
        raise errors.invalid_argument(path or "body", "must be a JSON object")
    if descriptor.full_name in WELL_KNOWN_AS_JSON:
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        where = f"{path}.{key}" if path else key
        if field is None:
            raise errors.invalid_argument(where, "is not a field of this request")
        out[field.name] = _normalize_field(field, value, where)
    return out


def _normalize_field(field: FieldDescriptor, value: Any, path: str) -> Any:
    if value is None:
        return None
    if is_map(field):
        return value
    if is_repeated(field):
        if not isinstance(value, list):
            raise errors.invalid_argument(path, "must be a list")
        return [_normalize_scalar(field, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return _normalize_scalar(field, value, path)


def field_mask_json(value: str) -> str:
    """A FieldMask as its JSON form (lowerCamelCase paths): REST callers write the proto
    names (`current_task`), which json_format would refuse."""
    return ",".join(
        re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), path.strip())
        for path in value.split(",")
        if path.strip()
    )


def _normalize_scalar(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_full(field.enum_type, value, path)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.FieldMask":
            if not isinstance(value, str):
                raise errors.invalid_argument(path, "must be a comma-separated list of fields")
            return field_mask_json(value)
        if field.message_type.full_name in WELL_KNOWN_AS_JSON:
            return value
        return normalize(value, field.message_type, path)
    return value


def from_json(data: dict[str, Any], message: Message) -> Message:
    """Fill `message` from JSON; INVALID_ARGUMENT naming the field on any mistake."""
    if _plain_strings(data, message.DESCRIPTOR):  # most reads: ids from the path
        for name, value in data.items():
            setattr(message, name, value)
        return message
    normalized = normalize(data, message.DESCRIPTOR)
    try:
        json_format.ParseDict(normalized, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        text = str(exc)
        match = re.search(
            r"field: ([\w.\[\]]+)|for field ([\w.]+)|Failed to parse (\w+) field", text
        )
        field = next((g for g in match.groups() if g), "body") if match else "body"
        raise errors.invalid_argument(
            field.rsplit(".", 1)[-1] if "." in field else field, text
        ) from None
    return message


def _plain_strings(data: dict[str, Any], descriptor: Descriptor) -> bool:
    """Whether every entry is a string for a singular string field of that exact name,
    which json_format would only copy (its own work is ~10x a plain assignment)."""
    fields = descriptor.fields_by_name
    for name, value in data.items():
        field = fields.get(name)
        if (
            field is None
            or type(value) is not str
            or field.type != FieldDescriptor.TYPE_STRING
            or is_repeated(field)
        ):
            return False
    return True


def query_value(field: FieldDescriptor, raw: str, path: str) -> Any:
    """A query-string value converted to the field's JSON type."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw.lower() in {"true", "1"}:
            return True
        if raw.lower() in {"false", "0"}:
            return False
        raise errors.invalid_argument(path, f"{raw!r} is not true or false")
    if field.type in INTEGER_TYPES:
        try:
            return int(raw)
        except ValueError:
            raise errors.invalid_argument(path, f"{raw!r} is not a whole number") from None
    if field.type in FLOAT_TYPES:
        try:
            return float(raw)
        except ValueError:
            raise errors.invalid_argument(path, f"{raw!r} is not a number") from None
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_full(field.enum_type, raw, path)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name in QUERY_MESSAGES:
            return raw  # their JSON form is a string: "a,b", "2026-11-27T00:00:00Z", "1.5s"
        raise errors.invalid_argument(path, "cannot be given in the query string")
    return raw
