"""OpenAPI 3.1 from the same descriptors as the routes, with the protos' comments."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from google.api.field_behavior_pb2 import OUTPUT_ONLY, REQUIRED
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from gateway.compat import COMPAT, OFFSET
from gateway.routes import Route
from services.common import codec
from services.common.validate import behaviors

SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_UINT64: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?\d+(\.\d+)?s$"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.rpc.Status": {"type": "object", "additionalProperties": True},
}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message", "details"],
            "properties": {
                "code": {"type": "integer", "description": "HTTP status code"},
                "status": {"type": "string", "description": "gRPC status name"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
}


def _comments() -> dict[str, str]:
    """Leading comments of messages and fields, by full name, from the descriptor set."""
    raw = resources.files("agentplane").joinpath("descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw)
    found: dict[str, str] = {}
    for file in files.file:
        if not file.package.startswith("agentplane."):
            continue
        for location in file.source_code_info.location:
            path = list(location.path)
            if len(path) < 2 or path[0] != 4 or not location.leading_comments:
                continue
            message = file.message_type[path[1]]
            name = f"{file.package}.{message.name}"
            if len(path) == 2:
                found[name] = location.leading_comments.strip()
            elif len(path) == 4 and path[2] == 2:
                found[f"{name}.{message.field[path[3]].name}"] = location.leading_comments.strip()
    return found


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {"ErrorEnvelope": ERROR_SCHEMA}
        self.comments = _comments()

    def ref(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[descriptor.full_name])
        name = descriptor.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder against recursion
            self.components[name] = self._message(descriptor)
        return {"$ref": f"#/components/schemas/{name}"}

    def _message(self, descriptor: Descriptor) -> dict[str, Any]:
        properties = {f.name: self.field(f) for f in descriptor.fields}
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        # From the protos' field_behavior: what a client must send, and what only the
        # server writes (the chassis enforces the first: services/common/validate.py).
        if required := [f.name for f in descriptor.fields if REQUIRED in behaviors(f)]:
            schema["required"] = required
        if doc := self.comments.get(descriptor.full_name):
            schema["description"] = doc
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if codec.is_map(field):
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self._single(value)}
        elif codec.is_repeated(field):
            schema = {"type": "array", "items": self._single(field)}
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            schema = {"anyOf": [self._single(field), {"type": "null"}]}
        else:
            schema = self._single(field)
        if doc := self.comments.get(field.full_name):
            schema["description"] = doc
        if OUTPUT_ONLY in behaviors(field):
            schema["readOnly"] = True
        return schema

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return self.ref(field.message_type)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return _enum(field.enum_type)
        return dict(SCALARS[field.type])


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [codec.enum_short(enum, v.number) for v in enum.values]}


LEGACY_PAGING_PARAMETERS = {
    "limit": {"minimum": 1, "maximum": 100},
    "offset": {"minimum": 0},
    "page": {"minimum": 1},
}


def _legacy_paging_parameters(style: str) -> list[dict[str, Any]]:
    names = ["limit", "offset"] if style == OFFSET else ["page", "limit"]
    return [
        {"name": n, "in": "query", "schema": {"type": "integer", **LEGACY_PAGING_PARAMETERS[n]}}
        for n in names
    ]


def _query_parameters(route: Route, schemas: _Schemas) -> list[dict[str, Any]]:
    if route.body == "*":
        return []
    compat = COMPAT.get((route.verb, route.template))
    taken = set(route.variables) | ({route.body} if route.body else set())
    params = []
    if compat:
        taken |= set(compat.fixed)
        if compat.paging:
            taken |= {"page_size", "skip", "page_token"}
            params += _legacy_paging_parameters(compat.paging)
    for field in route.method.input_type.fields:
        if field.name in taken or not _is_query_field(field):
            continue
        schema = schemas.field(field)
        description = schema.pop("description", "")
        param = {"name": field.name, "in": "query", "schema": schema, "description": description}
        if REQUIRED in behaviors(field):
            param["required"] = True
        params.append(param)
    return params


def _is_query_field(field: FieldDescriptor) -> bool:
    """Scalars, enums, FieldMasks, Timestamps and Durations travel in the query string;
    other messages do not."""
    return (
        field.type != FieldDescriptor.TYPE_MESSAGE
        or field.message_type.full_name in codec.QUERY_MESSAGES
    )


def _response_schema(route: Route, schemas: _Schemas) -> dict[str, Any]:
    compat = COMPAT.get((route.verb, route.template))
    if compat and compat.reshape is not None:
        return {"type": "object", "description": "the operators' legacy shape (see the README)"}
    return schemas.ref(route.method.output_type)


def build_openapi(routes: Sequence[Route]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        method = route.method
        compat = COMPAT.get((route.verb, route.template))
        status = str(compat.status if compat else 200)
        parameters = [
            {"name": v, "in": "path", "required": True, "schema": {"type": "string"}}
            for v in route.variables
        ] + _query_parameters(route, schemas)
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": f"{method.containing_service.name}.{method.name}",
            "tags": [method.containing_service.name],
            "parameters": parameters,
            "responses": {
                "default": {
                    "description": "an error",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorEnvelope"}
                        }
                    },
                }
            },
        }
        if route.streaming and method.output_type.full_name == "google.api.HttpBody":
            operation["responses"][status] = {
                "description": "a download (CSV or JSON, as asked), streamed",
                "content": {"text/csv": {"schema": {"type": "string"}},
                            "application/json": {"schema": {"type": "object"}}},
            }  # fmt: skip
        elif route.streaming:
            operation["responses"][status] = {
                "description": "server-sent events, one JSON message per `data:` line",
                # Each event's data is one message of the stream.
                "content": {"text/event-stream": {"schema": schemas.ref(method.output_type)}},
            }
        else:
            operation["responses"][status] = {
                "description": "success",
                "content": {"application/json": {"schema": _response_schema(route, schemas)}},
            }
        if route.body:
            body_schema = (
                schemas.ref(method.input_type)
                if route.body == "*"
                else schemas.field(method.input_type.fields_by_name[route.body])
            )
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": body_schema}},
            }
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agentplane",
            "version": "v1",
            "description": "Control plane for fleets of LLM agents. Generated from the gRPC "
            "services' google.api.http annotations; errors use the envelope below.",
        },
        "paths": paths,
        "components": {"schemas": schemas.components},
    }
