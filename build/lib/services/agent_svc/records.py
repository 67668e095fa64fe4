"""Conversions between stored records (flat Redis hashes) and the API's messages."""

from __future__ import annotations

import json

from google.protobuf import json_format, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_type_pb2, project_pb2
from services.agent_svc.lifecycle import status_value
from services.common import errors
from services.common.convert import timestamp
from services.common.limits import MAX_MEMORY_BYTES


def project_message(record: dict[str, str]) -> project_pb2.Project:
    return project_pb2.Project(
        id=record["id"],
        display_name=record.get("display_name", ""),
        owner=record.get("owner", ""),
        create_time=timestamp(record.get("create_ms")),
    )


def type_fields(agent_type: agent_type_pb2.AgentType) -> dict[str, str]:
    """The stored fields of a type (all but id and create time)."""
    return {
        "display_name": agent_type.display_name,
        "description": agent_type.description,
        "default_model": agent_type.default_model,
        "is_active": "1" if agent_type.is_active else "0",
        "input_schema": agent_type.input_schema,
        "example": agent_type.example,
    }


def type_message(record: dict[str, str]) -> agent_type_pb2.AgentType:
    return agent_type_pb2.AgentType(
        id=record["id"],
        display_name=record.get("display_name", ""),
        description=record.get("description", ""),
        default_model=record.get("default_model", ""),
        is_active=record.get("is_active") == "1",
        input_schema=record.get("input_schema", ""),
        example=record.get("example", ""),
        create_time=timestamp(record.get("create_ms")),
    )


def memory_text(memory: struct_pb2.Struct, field: str) -> str:
    text = json_format.MessageToJson(memory, indent=None)
    if len(text.encode()) > MAX_MEMORY_BYTES:
        raise errors.invalid_argument(field, f"is larger than {MAX_MEMORY_BYTES} bytes")
    return text


def agent_message(
    record: dict[str, str], type_name: str = "", project_name: str = ""
) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=record["id"],
        project_id=record.get("project_id", ""),
        agent_type_id=record.get("agent_type_id", ""),
        name=record.get("name", ""),
        description=record.get("description", ""),
        status=status_value(record["status"]),  # type: ignore[arg-type]
        current_task=record.get("current_task", ""),
        long_term_memory_ref=record.get("long_term_memory_ref", ""),
        session_id=record.get("session_id", ""),
        peers=json.loads(record.get("peers") or "[]"),
        last_activity_time=timestamp(record.get("last_activity_ms")),
        terminate_time=timestamp(record.get("terminate_ms")),
        create_time=timestamp(record.get("create_ms")),
        update_time=timestamp(record.get("update_ms")),
        tasks_completed=int(record.get("tasks_completed", 0)),
        agent_type_name=type_name,
        project_name=project_name,
    )
    if record.get("short_term_memory"):
        json_format.Parse(record["short_term_memory"], agent.short_term_memory)
    return agent
