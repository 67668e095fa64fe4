"""The `agentplane` command against a real cluster: each command, `--json` that parses,
exit codes 1 (the API refused; its message printed) and 2 (bad usage)."""

from __future__ import annotations

import asyncio
import json
import sys

from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, make_project, make_type, sdk_env, spawn


async def cli(cluster, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    env = sdk_env(cluster, token)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentplane.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_every_command_against_the_cluster(cluster) -> None:
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha = await spawn(cluster.agent, "alpha")

    code, out, _ = await cli(cluster, "agents", "list")
    assert code == 0 and "alpha" in out and "IDLE" in out and out.startswith("ID")
    code, out, _ = await cli(
        cluster, "--json", "agents", "list", "--project", "demo", "--status", "IDLE"
    )
    assert code == 0 and [a["name"] for a in json.loads(out)["agents"]] == ["alpha"]
    for verb, status in (("pause", "PAUSED"), ("resume", "IDLE"), ("get", "IDLE")):
        code, out, _ = await cli(cluster, "--json", "agents", verb, alpha.id)
        assert code == 0 and json.loads(out)["status"] == f"AGENT_STATUS_{status}", out

    code, out, _ = await cli(cluster, "--json", "inject", alpha.id, '{"text": "hello"}')
    thread_id = json.loads(out)["thread_id"]
    code, out, _ = await cli(cluster, "threads", "list", "--status", "ACTIVE")
    assert code == 0 and thread_id in out
    tail = asyncio.create_task(cli(cluster, "threads", "tail", thread_id))
    await asyncio.sleep(1.5)
    code, out, _ = await cli(cluster, "--json", "threads", "kill", thread_id, "--reason", "done")
    assert code == 0 and json.loads(out)["status"] == "THREAD_STATUS_KILLED"
    code, out, _ = await tail  # the tail ends with the thread
    assert code == 0 and '"hello"' in out and "-- thread KILLED" in out

    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id="u1", agent_id=alpha.id, thread_id=thread_id, model="gpt-4o",
        prompt_tokens=100, completion_tokens=20))  # fmt: skip
    code, out, _ = await cli(cluster, "--json", "usage", "--by", "model", "--since", "1h")
    assert code == 0 and json.loads(out)["groups"][0] == {
        "model": "gpt-4o", "tokens": 120, "requests": 1, "cost_usd": json.loads(out)["groups"][0]["cost_usd"]}  # fmt: skip
    code, out, _ = await cli(cluster, "usage", "--by", "agent")
    assert code == 0 and alpha.id in out

    code, out, _ = await cli(cluster, "--json", "budgets", "create", "--project", "demo",
                             "--limit-tokens", "1000", "--enforcement", "SOFT")  # fmt: skip
    budget_id = json.loads(out)["budget_id"]
    code, out, _ = await cli(cluster, "budgets", "list", "--project", "demo")
    assert code == 0 and budget_id in out and "SOFT" in out
    code, out, _ = await cli(cluster, "--json", "budgets", "reset", "--project", "demo", budget_id)
    assert code == 0 and json.loads(out)["budget_id"] == budget_id

    code, out, _ = await cli(cluster, "agents", "terminate", alpha.id)
    assert code == 0 and "TERMINATED" in out


async def test_exit_codes_say_what_went_wrong(cluster) -> None:
    code, _, err = await cli(cluster, "agents", "list", token="not-a-real-token-0123456789")
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _, err = await cli(cluster, "agents", "get", "no-such-agent")
    assert code == 1 and "NOT_FOUND" in err and "no-such-agent" in err
    code, _, err = await cli(cluster, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = await cli(cluster, "inject", "a1", "not json")
    assert code == 2 and "payload is not JSON" in err
    code, _, err = await cli(cluster, "usage", "--since", "soon")
    assert code == 2 and "not a duration" in err
