"""The record script sums a call's aggregates (shard and project totals, per agent, per
model, ranks, time buckets) and writes each key once: a batch must leave Redis exactly as
the same records sent one RPC at a time do, with budgets, reservations, duplicates and
conflicts among them."""

from __future__ import annotations

import contextlib
import re

import grpc
import redis as redis_sync
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from agentplane.usage.v1 import usage_pb2 as B
from agentplane.usage.v1 import usage_service_pb2 as U
from tests.helpers import make_project
from tests.helpers.servers import start_cluster, stop_cluster
from tests.usage_svc.test_usage import record

VOLATILE = {"update_ms", "ut", "ct"}  # times of writing, not of what was written
# Keys named by server-made budget ids, or holding them or stream entry ids: compared
# through the API instead (budget_states, alerts).
BUDGET_KEYS = re.compile(r":budget:|:cover$|:alerts$|:alert:|:p:[^:]+:budgets")


def records() -> list[U.RecordUsageRequest]:
    out = []
    for i in range(240):
        j = i % 200  # the last 40 repeat earlier records exactly: duplicates
        out.append(
            record(
                f"u{j}", thread=f"t{j % 7}", agent=f"a{j % 5}",
                model=("gpt-4o", "gpt-4o-mini", "x-1")[j % 3],
                project_id=("demo", "other")[j % 7 % 2], prompt_tokens=10 + j % 13,
                completion_tokens=2 + j % 11, latency_ms=j % 17,
                cached_prompt_tokens=j % 5, reasoning_tokens=j % 3,
                reservation_id=f"r{j}" if j % 4 == 0 else "",
            )
        )  # fmt: skip
    out.append(record("u3", thread="t3", project_id="other", prompt_tokens=1))  # a conflict
    return out


BUCKET = re.compile(r"(ts:[hd]:)\d+$")


def snapshot(url: str) -> dict[str, object]:
    """Every usage key and its value; time buckets merged per kind (hour, day), so a run
    that crosses an hour compares equal to one that does not."""
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    seen: dict[str, object] = {}
    for key in sorted(client.scan_iter("ap:usage:*")):
        if BUDGET_KEYS.search(key):
            continue
        kind = client.type(key)
        if BUCKET.search(key):
            merged = seen.setdefault(BUCKET.sub(r"\1*", key), {})
            for field, packed in client.hgetall(key).items():
                counts = [int(n) for n in packed.split(",")]
                old = merged.get(field, [0] * len(counts))  # type: ignore[union-attr]
                merged[field] = [a + b for a, b in zip(old, counts, strict=True)]  # type: ignore[index]
            continue
        if kind == "hash":
            value = {f: v for f, v in client.hgetall(key).items() if f not in VOLATILE}
        elif kind == "zset" and key.endswith(":expiring"):
            value = client.zrange(key, 0, -1)  # when to look again: a time, not usage
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            value = client.get(key)
            if ":usage:" in key:  # a usage id's first answer: its last field is update_ms
                value = value.rpartition("|")[0]
        else:
            value = kind
        seen[key] = value
    client.close()
    return seen


async def fill(stub) -> None:
    """Thread budgets, reservations the records settle, and covering budgets (project,
    model) whose thresholds the records cross."""
    for scope, scope_id, limit in ((B.BUDGET_SCOPE_PROJECT, "", 3000),
                                   (B.BUDGET_SCOPE_MODEL, "gpt-4o", 1500)):  # fmt: skip
        await stub.CreateBudget(
            U.CreateBudgetRequest(
                project_id="demo",
                budget=B.Budget(
                    scope=scope, scope_id=scope_id, limit_tokens=limit,
                    period=B.BUDGET_PERIOD_MONTH, alert_thresholds=[10, 50, 80, 100],
                ),
            )
        )  # fmt: skip
    for t in range(7):
        project = ("demo", "other")[t % 2]
        await stub.SetThreadBudget(
            U.SetThreadBudgetRequest(project_id=project, thread_id=f"t{t}", max_tokens=10**9)
        )
    for i in range(0, 200, 4):
        await stub.ReserveBudget(
            U.ReserveBudgetRequest(
                reservation_id=f"r{i}", thread_id=f"t{i % 7}", tokens=40,
                ttl=duration_pb2.Duration(seconds=600),
            )
        )  # fmt: skip


@contextlib.asynccontextmanager
async def services(redis_url: str):
    """The three services (budgets check their project with the agent service)."""
    cluster = await start_cluster(redis_url)
    try:
        for project in ("demo", "other"):
            await make_project(cluster.agent, project)
        yield cluster.usage
    finally:
        await stop_cluster(cluster)


async def budget_states(stub) -> list[tuple]:
    listed = await stub.ListBudgets(U.ListBudgetsRequest(project_id="demo"))
    return sorted(
        (b.scope, b.scope_id, b.used_tokens, b.used_cost_micros, b.reserved_tokens,
         b.percent_used, b.is_exhausted)
        for b in listed.budgets
    )  # fmt: skip


async def alerts(url: str) -> list[str]:
    """The alerts raised (budget id replaced by its scope: ids differ between runs)."""
    client = redis_sync.Redis.from_url(url, decode_responses=True)
    raised = []
    for key in client.scan_iter("ap:usage:*:alerts"):
        for _, fields in client.xrange(key):
            parts = fields["a"].split("|")  # alert id, budget id, project, scope, sid, th ...
            # (the percentage shown is the usage when the alert was raised: for a batch,
            # after all its records, so it is not compared)
            raised.append(f"{parts[3]}|{parts[4]}|{parts[5]}")
    client.close()
    return sorted(raised)


async def test_a_batch_leaves_redis_as_one_rpc_per_record_does(redis_url) -> None:
    async with services(redis_url) as stub:
        await fill(stub)
        one_by_one = []
        for request in records():
            try:
                one_by_one.append((await stub.RecordUsage(request)).duplicate)
            except grpc.aio.AioRpcError as exc:  # the conflict
                one_by_one.append(exc.code())
        alone = snapshot(redis_url)
        alone_budgets, alone_alerts = await budget_states(stub), await alerts(redis_url)
    redis_sync.Redis.from_url(redis_url).flushall()
    async with services(redis_url) as stub:
        await fill(stub)
        reply = await stub.RecordUsageBatch(U.RecordUsageBatchRequest(requests=records()))
        together = snapshot(redis_url)
        together_budgets, together_alerts = await budget_states(stub), await alerts(redis_url)
    assert sum(r.response.duplicate for r in reply.results) == 40
    assert [r.status.code for r in reply.results if r.status.code] == [code_pb2.ALREADY_EXISTS]
    assert one_by_one.count(True) == 40
    assert one_by_one[-1] == grpc.StatusCode.ALREADY_EXISTS
    assert alone.keys() == together.keys()
    different = [key for key in alone if alone[key] != together[key]]
    assert not different, [(k, alone[k], together[k]) for k in different[:3]]
    # Covering budgets: the same usage, and every threshold crossed fired once either way.
    assert alone_budgets == together_budgets and len(alone_budgets) == 2
    assert alone_alerts == together_alerts and len(alone_alerts) >= 4
