"""One racing client process of tests/e2e/test_budget_race.py.

`python -m tests.e2e.budget_race_client <seed> <rounds> <addr> [<addr>...]`: reserve, then
record at most what was reserved (settling the reservation), alternating replicas and
sometimes sending the record twice (to both); prints one JSON line per record accepted as
new: {"usage_id", "agent", "model", "tokens", "cost"}.
"""

from __future__ import annotations

import json
import random
import sys

import grpc

from agentplane.usage.v1 import usage_service_pb2 as U
from agentplane.usage.v1 import usage_service_pb2_grpc
from tests.helpers import ADMIN_TOKEN


def main() -> None:
    seed, rounds, agents, *addresses = sys.argv[1:]
    rng = random.Random(int(seed))
    metadata = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    stubs = [
        usage_service_pb2_grpc.UsageServiceStub(grpc.insecure_channel(address))
        for address in addresses
    ]
    agent_ids = agents.split(",")
    for i in range(int(rounds)):
        stub = stubs[i % len(stubs)]
        agent = rng.choice(agent_ids)
        model = rng.choice(["gpt-4o", "mystery-model"])
        thread = f"t{rng.randrange(4)}"
        tokens = rng.randrange(50, 400)
        rid = f"r-{seed}-{i}"
        try:
            stub.ReserveBudget(
                U.ReserveBudgetRequest(reservation_id=rid, thread_id=thread, tokens=tokens,
                                       agent_id=agent, model=model),
                metadata=metadata, timeout=10,
            )  # fmt: skip
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            continue
        used = rng.randrange(1, tokens + 1)
        prompt = rng.randrange(0, used + 1)
        request = U.RecordUsageRequest(
            usage_id=f"u-{seed}-{i}", thread_id=thread, agent_id=agent, project_id="race",
            model=model, prompt_tokens=prompt, completion_tokens=used - prompt,
            reservation_id=rid, latency_ms=5,
        )  # fmt: skip
        targets = stubs if rng.random() < 0.3 else [stub]  # a retry, to the other replica
        answers = [s.RecordUsage(request, metadata=metadata, timeout=10) for s in targets]
        new = [a for a in answers if not a.duplicate]
        assert len(new) == 1, answers
        print(json.dumps({"usage_id": request.usage_id, "agent": agent, "model": model,
                          "tokens": used, "cost": new[0].cost_micros}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
