"""A runnable agent: it answers each message in its inbox with a stand-in "model" whose
every call is guarded by the thread's budget and reports its token usage.

    make run                                   # terminal 1: the cluster
    python examples/agent.py                   # terminal 2: sets up a demo agent, runs it
    agentplane inject <agent id> '{"text": "summarise the quarter"}' && agentplane usage

With the superuser token (AGENTPLANE_TOKEN or .admin-token) it creates, if missing, the
project `demo`, the agent type `assistant` and the agent `example`, makes an API key for
that agent, and runs the worker with the agent's own key. Each answer is posted back to
the message's thread (to the operator, or to the agent that asked), so the console's
thread page shows the whole exchange. Ctrl-C or SIGTERM stops it cleanly, and the key it
made is revoked on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path

import grpc

from agentplane.agent.v1 import agent_pb2, agent_type_pb2, api_key_pb2, project_pb2
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.client import AgentplaneClient, BudgetExhausted
from agentplane.thread.v1 import thread_pb2
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.worker import Worker

MODEL = "gpt-4o-mini"


def admin_token() -> str:
    saved = Path(".admin-token")
    return os.environ.get("AGENTPLANE_TOKEN") or (
        saved.read_text().strip() if saved.is_file() else ""
    )


async def ensure(call, request) -> None:  # type: ignore[no-untyped-def]
    try:
        await call(request)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


async def set_up(admin: AgentplaneClient) -> tuple[str, str, str]:
    """The demo agent's id, a fresh API key for it, and that key's id."""
    c = admin
    await ensure(
        lambda r: c.call(c.agents.CreateProject, r),
        A.CreateProjectRequest(project_id="demo", project=project_pb2.Project(display_name="Demo")),
    )
    await ensure(
        lambda r: c.call(c.agents.CreateAgentType, r),
        A.CreateAgentTypeRequest(
            agent_type=agent_type_pb2.AgentType(
                id="assistant", display_name="Assistant", is_active=True
            )
        ),
    )
    listed = await c.call(
        c.agents.ListAgents, A.ListAgentsRequest(project_id="demo", page_size=100)
    )
    agent = next(
        (
            a
            for a in listed.agents
            if a.name == "example" and a.status != agent_pb2.AGENT_STATUS_TERMINATED
        ),
        None,
    )
    if agent is None:
        agent = await c.call(
            c.agents.SpawnAgent,
            A.SpawnAgentRequest(
                project_id="demo", agent=agent_pb2.Agent(agent_type_id="assistant", name="example")
            ),
        )
    key = await c.call(
        c.agents.CreateApiKey,
        A.CreateApiKeyRequest(role=api_key_pb2.API_KEY_ROLE_AGENT, subject=agent.id),
    )
    return agent.id, key.token, key.api_key.key_id


def stand_in_model(text: str) -> tuple[str, int, int]:
    """(answer, prompt tokens, completion tokens): roughly what a real model reports."""
    prompt = 40 + len(text.split()) * 2
    answer = f"Noted: {text[:80]}"
    return answer, prompt, len(answer.split()) * 2 + random.randint(5, 20)


async def answer(client: AgentplaneClient, agent_id: str, asked: thread_pb2.Message,
                 text: str) -> None:  # fmt: skip
    """Post the answer into the message's thread: to the operator who injected it (who has
    no inbox; it shows in the thread), or back to the agent that asked."""
    reply = T.PostMessageRequest(
        thread_id=asked.thread_id, from_agent=agent_id, to_agent=asked.from_agent,
        payload_type="answer", request_id=f"answer-{asked.id}",
    )  # fmt: skip
    reply.payload.update({"text": text, "in_reply_to": asked.id})
    await client.call(client.threads.PostMessage, reply)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def prepare() -> tuple[str, str, str]:
        async with AgentplaneClient(token=admin_token()) as admin:
            return await set_up(admin)

    async def revoke(key_id: str) -> None:
        async with AgentplaneClient(token=admin_token()) as admin:
            await admin.call(admin.agents.RevokeApiKey, A.RevokeApiKeyRequest(key_id=key_id))

    agent_id, agent_token, key_id = asyncio.run(prepare())
    client = AgentplaneClient(token=agent_token)

    async def handle(message: thread_pb2.Message) -> None:
        if message.payload_type == "answer":
            return  # an answer to one of ours: nothing to say back
        text = str(message.payload["text"]) if "text" in message.payload else ""
        try:
            async with client.budget.guard(message.thread_id, tokens=500, model=MODEL,
                                           agent_id=agent_id) as guard:  # fmt: skip
                said, prompt, completion = stand_in_model(text)
                await asyncio.sleep(0.05)  # the "model call"
                guard.record(prompt_tokens=prompt, completion_tokens=completion, latency_ms=50)
        except BudgetExhausted as refused:
            logging.warning("over budget %s: not answering %s", refused.subjects, message.id)
            return
        await answer(client, agent_id, message, said)
        logging.info("answered %s (%d + %d tokens): %s", message.id, prompt, completion, said)

    print(f"ready: agent {agent_id} (project demo); inject a message to it", flush=True)
    try:
        Worker(agent_id, handle, client=client, concurrency=4).run_forever()
    finally:
        asyncio.run(revoke(key_id))  # one run, one key: none left behind
        logging.info("revoked this run's key %s", key_id)


if __name__ == "__main__":
    main()
