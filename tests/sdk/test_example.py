"""The example agent (examples/agent.py) as a real process against a real cluster: it
answers injected messages within their budgets, its usage is counted, and SIGTERM stops
it cleanly (exit 0) within 10 s."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from google.protobuf import struct_pb2

from agentplane.agent.v1 import agent_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import ADMIN_TOKEN, sdk_env, until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent.py"


async def test_the_example_agent_works_and_stops_on_sigterm(cluster, tmp_path) -> None:
    env = sdk_env(cluster, ADMIN_TOKEN)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("ready: agent "):
            rest = await asyncio.wait_for(proc.stdout.read(), 10)
            raise AssertionError(line + rest.decode())
        agent_id = line.split()[2]
        first = None
        for n in range(3):
            body = struct_pb2.Struct()
            body.update({"text": f"question {n}"})
            sent = await cluster.thread.InjectMessage(T.InjectMessageRequest(
                to=agent_id, payload=body, thread_id=first or ""))  # fmt: skip
            first = first or sent.thread_id

        async def counted() -> bool:
            totals = (await cluster.usage.GetUsageOverview(U.GetUsageOverviewRequest())).totals
            return totals.request_count == 3

        await until(counted, timeout=20)
        budget = await cluster.usage.GetThreadBudget(U.GetThreadBudgetRequest(thread_id=first))
        assert budget.total_tokens > 0 and budget.reserved_tokens == 0  # settled, not held

        async def idle() -> bool:
            agent = await cluster.agent.GetAgent(A.GetAgentRequest(agent_id=agent_id))
            return agent.status == agent_pb2.AGENT_STATUS_IDLE and agent.tasks_completed >= 1

        await until(idle)

        # Its answers are in the thread, from the agent to the operator, in no inbox.
        async def answered() -> bool:
            found = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id=first))
            return sum(m.payload_type == "answer" for m in found.messages) == 3

        await until(answered, timeout=10)
        listed = await cluster.thread.ListMessages(T.ListMessagesRequest(thread_id=first))
        answers = [m for m in listed.messages if m.payload_type == "answer"]
        assert {(m.from_agent, m.to_agent) for m in answers} == {(agent_id, "operator")}
        assert all(m.payload["text"].startswith("Noted: question") for m in answers)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        # The run's key is revoked: run twice, no live key is left behind.
        keys = await cluster.agent.ListApiKeys(A.ListApiKeysRequest())
        mine = [k for k in keys.api_keys if k.subject == agent_id]
        assert len(mine) == 1 and mine[0].revoked
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
