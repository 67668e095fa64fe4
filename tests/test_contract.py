"""The protos are the contract: buf lint clean, generated code in sync, every RPC routed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2

from agentplane.agent.v1 import agent_service_pb2
from agentplane.thread.v1 import thread_service_pb2
from agentplane.usage.v1 import usage_service_pb2

ROOT = Path(__file__).resolve().parents[1]
SERVICES = [
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
    thread_service_pb2.DESCRIPTOR.services_by_name["ThreadService"],
    usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
]


def test_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.gen_protos", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_is_clean_on_a_fresh_checkout(tmp_path) -> None:
    """Plain `buf lint`, in a copy of the tracked protos and buf.yaml alone: nothing that a
    make target lays out first is needed."""
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    if not Path(buf).exists():
        pytest.fail("buf is not installed (pip install buf-bin, part of the dev extra)")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    result = subprocess.run(
        [buf, "lint"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_every_rpc_has_an_http_route(service) -> None:
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        assert rule.WhichOneof("pattern"), f"{method.full_name} has no google.api.http route"
        path = getattr(rule, rule.WhichOneof("pattern"))
        assert path.startswith("/api/v1/"), path


SEED_ROUTES = {
    ("get", "/api/v1/organism"): "GetOverview",
    ("get", "/api/v1/capabilities"): "ListAgentTypes",
    ("get", "/api/v1/capabilities/{agent_type_id}"): "GetAgentType",
    ("get", "/api/v1/agents"): "ListAgents",
    ("get", "/api/v1/agents/{agent_id}"): "GetAgent",
    ("get", "/api/v1/agents/{agent_id}/schema"): "GetAgentSchema",
    ("get", "/api/v1/agents/{agent_id}/config"): "GetAgent",
    ("post", "/api/v1/agents/{agent_id}/pause"): "PauseAgent",
    ("post", "/api/v1/agents/{agent_id}/resume"): "ResumeAgent",
    ("get", "/api/v1/threads"): "ListThreads",
    ("get", "/api/v1/threads/{thread_id}"): "GetThread",
    ("get", "/api/v1/threads/{thread_id}/messages"): "ListMessages",
    ("post", "/api/v1/threads/{thread_id}/kill"): "KillThread",
    ("get", "/api/v1/messages"): "ListMessages",
    ("post", "/api/v1/inject"): "InjectMessage",
    ("get", "/api/v1/usage"): "GetUsageOverview",
    ("get", "/api/v1/usage/threads"): "ListThreadBudgets",
    ("get", "/api/v1/usage/threads/{thread_id}"): "GetThreadBudget",
    ("get", "/api/v1/usage/agents/{agent_id}"): "GetAgentUsage",
    ("get", "/api/v1/usage/models/{model}"): "GetModelUsage",
    ("post", "/api/v1/usage/reset"): "ResetUsage",
    ("post", "/api/v1/projects/{project_id}/agents"): "SpawnAgent",
    ("get", "/api/v1/projects/{project_id}/agents"): "ListAgents",
    ("get", "/api/v1/projects/{project_id}/agents/metrics"): "GetProjectAgentMetrics",
    ("get", "/api/v1/projects/{project_id}/agents/{agent_id}"): "GetAgent",
    ("patch", "/api/v1/projects/{project_id}/agents/{agent_id}"): "UpdateAgent",
    ("delete", "/api/v1/projects/{project_id}/agents/{agent_id}"): "TerminateAgent",
    ("post", "/api/v1/projects/{project_id}/agents/{agent_id}/pause"): "PauseAgent",
    ("post", "/api/v1/projects/{project_id}/agents/{agent_id}/resume"): "ResumeAgent",
    ("get", "/api/v1/projects/{project_id}/agents/{agent_id}/metrics"): "GetAgentMetrics",
}


def test_the_operators_seed_routes_exist() -> None:
    routes = {}
    for service in SERVICES:
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                verb = binding.WhichOneof("pattern")
                routes[(verb, getattr(binding, verb))] = method.name
    missing = {route: rpc for route, rpc in SEED_ROUTES.items() if routes.get(route) != rpc}
    assert not missing, missing
