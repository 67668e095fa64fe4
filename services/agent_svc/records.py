"""Conversions between the store's records and the API's messages."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from agentplane.agent.v1 import agent_pb2, agent_type_pb2, api_key_pb2, project_pb2
from services.agent_svc.lifecycle import status_value
from services.agent_svc.store import AgentRecord, KeyRecord, ProjectRecord, TypeRecord
from services.common import enums, errors
from services.common.convert import timestamp
from services.common.limits import MAX_MEMORY_BYTES


def project_message(record: ProjectRecord) -> project_pb2.Project:
    return project_pb2.Project(
        id=record.id,
        display_name=record.display_name,
        owner=record.owner,
        create_time=timestamp(record.create_ms),
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


def type_message(record: TypeRecord) -> agent_type_pb2.AgentType:
    return agent_type_pb2.AgentType(
        id=record.id,
        display_name=record.display_name,
        description=record.description,
        default_model=record.default_model,
        is_active=record.is_active,
        input_schema=record.input_schema,
        example=record.example,
        create_time=timestamp(record.create_ms),
    )


def memory_text(memory: struct_pb2.Struct, field: str) -> str:
    text = json_format.MessageToJson(memory, indent=None)
    if len(text.encode()) > MAX_MEMORY_BYTES:
        raise errors.invalid_argument(field, f"is larger than {MAX_MEMORY_BYTES} bytes")
    return text


def agent_message(
    record: AgentRecord, type_name: str = "", project_name: str = ""
) -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        id=record.id,
        project_id=record.project_id,
        agent_type_id=record.agent_type_id,
        name=record.name,
        description=record.description,
        status=status_value(record.status),
        current_task=record.current_task,
        long_term_memory_ref=record.long_term_memory_ref,
        session_id=record.session_id,
        peers=record.peers,
        last_activity_time=timestamp(record.last_activity_ms),
        terminate_time=timestamp(record.terminate_ms),
        create_time=timestamp(record.create_ms),
        update_time=timestamp(record.update_ms),
        tasks_completed=record.tasks_completed,
        agent_type_name=type_name,
        project_name=project_name,
    )
    if record.short_term_memory_json:
        json_format.Parse(record.short_term_memory_json, agent.short_term_memory)
    return agent


def key_message(record: KeyRecord) -> api_key_pb2.ApiKey:
    return api_key_pb2.ApiKey(
        key_id=record.key_id,
        role=enums.value_of(api_key_pb2.ApiKeyRole, record.role),
        subject=record.subject,
        project_id=record.project_id,
        create_time=timestamp(record.create_ms),
        revoked=record.revoked,
        created_by=record.created_by,
    )
