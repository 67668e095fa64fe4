"""The `agentplane` command against a real cluster: each command, `--json` that parses,
exit codes 1 (the API refused; its message printed) and 2 (bad usage)."""

from __future__ import annotations

import asyncio
import json
import sys

from agentplane.agent.v1 import agent_service_pb2
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
    # Limits per minute and calls in flight, as the operator types them.
    code, out, _ = await cli(cluster, "--json", "budgets", "create", "--project", "demo",
                             "--period", "minute", "--limit-tokens", "100000",
                             "--limit-requests", "600", "--max-in-flight", "8")  # fmt: skip
    made = json.loads(out)
    assert code == 0 and made["period"] == "BUDGET_PERIOD_MINUTE"
    assert (made["limit_requests"], made["max_in_flight"]) == (600, 8)
    code, out, _ = await cli(cluster, "budgets", "list", "--project", "demo")
    assert code == 0 and "MAX_IN_FLIGHT" in out.upper() and "600" in out

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


async def run_cli(
    *args: str, env: dict[str, str], cwd: str | None = None, stdout=None
) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentplane.cli", *args, env=env, cwd=cwd,
        stdout=stdout or asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, (out or b"").decode(), err.decode()


async def test_options_anywhere_service_addresses_and_json_as_the_api_has_it(
    cluster, tmp_path
) -> None:
    await make_project(cluster.agent)
    await make_type(cluster.agent)
    # --json after the subcommand; an empty project lists [] (jq '.agents[]' works).
    code, out, err = await cli(cluster, "agents", "list", "--project", "demo", "--json")
    assert code == 0 and json.loads(out)["agents"] == [], (out, err)
    alpha = await spawn(cluster.agent, "alpha")
    await cluster.agent.PauseAgent(agent_service_pb2.PauseAgentRequest(agent_id=alpha.id))
    # enum values in any case; every field present, 64-bit numbers as numbers
    code, out, err = await cli(cluster, "agents", "list", "--status", "paused", "--json")
    (shown,) = json.loads(out)["agents"]
    assert code == 0 and shown["tokens_used"] == 0 and shown["current_task"] == "", shown
    # The services' own variables (a pod's environment), and per-service flags.
    env = {"AGENT_SVC_ADDR": cluster.address("agent"), "THREAD_SVC_ADDR": cluster.address("thread"),
           "USAGE_SVC_ADDR": cluster.address("usage"), "AGENTPLANE_TOKEN": ADMIN_TOKEN + "\n",
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    code, out, err = await run_cli("agents", "get", alpha.id, "--json", env=env)
    assert code == 0 and json.loads(out)["id"] == alpha.id, err  # the newline was stripped
    flags = ["--agent-addr", cluster.address("agent"), "--thread-addr", cluster.address("thread"),
             "--usage-addr", cluster.address("usage")]  # fmt: skip
    code, out, err = await run_cli(
        "threads", "list", *flags, "--token", ADMIN_TOKEN, env={"PATH": "/usr/bin:/bin"}
    )
    assert code == 0 and out.startswith("ID"), err
    # A kill's reason shows; costs are plain decimals; budgets list shows cost limits.
    code, out, _ = await cli(cluster, "--json", "inject", alpha.id, '{"text": "hi"}')
    thread_id = json.loads(out)["thread_id"]
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id="u1", agent_id=alpha.id, thread_id=thread_id, model="gpt-4o", prompt_tokens=7))  # fmt: skip
    code, out, _ = await cli(cluster, "usage", "--json")
    assert code == 0 and "e-" not in out and json.loads(out)["groups"][0]["cost_usd"] > 0, out
    code, out, _ = await cli(cluster, "threads", "kill", thread_id, "--reason", "runaway loop")
    assert code == 0 and "runaway loop" in out
    code, out, _ = await cli(cluster, "threads", "list", "--status", "killed")
    assert "runaway loop" in out
    code, out, _ = await cli(
        cluster, "budgets", "create", "--project", "demo", "--limit-usd", "2.5"
    )
    assert code == 0
    code, out, _ = await cli(cluster, "budgets", "list", "--project", "demo")
    assert "LIMIT_USD" in out and "2.5" in out, out


async def test_bad_input_is_exit_2_with_a_message_never_a_traceback(cluster, tmp_path) -> None:
    await make_project(cluster.agent)
    for args in (
        ["usage", "--since", "nan"],
        ["usage", "--since", "inf"],
        ["usage", "--since", "1e20s"],
        ["budgets", "create", "--project", "demo", "--limit-usd", "nan"],
        ["budgets", "create", "--project", "demo", "--limit-usd", "inf"],
        ["budgets", "create", "--project", "demo", "--limit-tokens", "1e23"],
        ["budgets", "create", "--project", "demo", "--limit-tokens", "100000000000000000000000"],
        ["budgets", "create", "--project", "demo", "--alerts", "99999999999"],
        ["--addr", "localhost:99999", "agents", "list"],
        ["agents", "list", "--agent-addr", "nohost"],
    ):
        code, _, err = await cli(cluster, *args)
        assert code == 2 and "Traceback" not in err and err.strip(), (args, code, err)
    # No token anywhere: say where the CLI looked.
    env = {"AGENTPLANE_AGENT_ADDR": cluster.address("agent"), "PATH": "/usr/bin:/bin"}
    code, _, err = await run_cli("agents", "list", env=env, cwd=str(tmp_path))
    assert code == 2 and "--token" in err and "AGENTPLANE_TOKEN" in err and ".admin-token" in err


async def test_a_closed_pipe_ends_the_cli_quietly(cluster) -> None:
    """`agentplane --json budgets list | head -3` once printed a BrokenPipeError traceback:
    here the reader is gone before the CLI writes a byte, every time."""
    import os

    await make_project(cluster.agent)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        code, _, err = await run_cli(
            "--json", "agents", "list", env=sdk_env(cluster, ADMIN_TOKEN), stdout=write_end
        )
    finally:
        os.close(write_end)
    assert code == 141 and err == "", err


async def test_calls_list_shows_the_model_gateways_call_log(cluster) -> None:
    from google.protobuf import timestamp_pb2
    from ulid import ULID

    from agentplane.usage.v1 import usage_pb2 as P

    await make_project(cluster.agent)
    await make_type(cluster.agent)
    alpha = await spawn(cluster.agent, "alpha")
    start = timestamp_pb2.Timestamp()
    start.GetCurrentTime()
    call = P.ModelCall(
        call_id=str(ULID()), project_id="demo", agent_id=alpha.id, model_requested="gpt-4o",
        model="gpt-4o-2026", provider="openai-main", outcome=P.MODEL_CALL_OUTCOME_OK,
        http_status=200, start_time=start, operation="chat.completions",
    )  # fmt: skip
    await cluster.usage.RecordUsage(U.RecordUsageRequest(
        usage_id=call.call_id, agent_id=alpha.id, project_id="demo", model="gpt-4o",
        prompt_tokens=1000, completion_tokens=100, call=call))  # fmt: skip
    refused = P.ModelCall(call_id=str(ULID()), project_id="demo", agent_id=alpha.id,
                          model_requested="gpt-4o", outcome=P.MODEL_CALL_OUTCOME_REFUSED,
                          reason="budget_exceeded", http_status=429)  # fmt: skip
    await cluster.usage.LogModelCall(U.LogModelCallRequest(call=refused))
    code, out, _ = await cli(cluster, "calls", "list", "--project", "demo")
    assert code == 0 and out.startswith("START_TIME") and "budget_exceeded" in out and "1100" in out
    code, out, _ = await cli(
        cluster, "--json", "calls", "list", "--project", "demo", "--outcome", "ok"
    )
    (only,) = json.loads(out)["calls"]
    assert only["call_id"] == call.call_id and only["usage"]["total_tokens"] == 1100
    code, _, err = await cli(cluster, "calls", "list", "--project", "demo", "--outcome", "nope")
    assert code == 2 and "--outcome" in err
