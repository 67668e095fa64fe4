"""`agentplane`: the operators' command line.

    agentplane agents list|get|pause|resume|terminate
    agentplane threads list|tail|kill
    agentplane inject AGENT JSON
    agentplane usage [--by model|agent] [--since 24h]
    agentplane budgets list|create|reset

Tables by default, `--json` for scripts. Where the services are: `--addr HOST[:PORT]`
(or AGENTPLANE_ADDR; the agent, thread and usage services on PORT, PORT+1, PORT+2,
default localhost:50051), or one by one with AGENTPLANE_AGENT_ADDR, _THREAD_ADDR,
_USAGE_ADDR. The token: `--token`, AGENTPLANE_TOKEN, or `.admin-token` in the working
directory. Exit codes: 0 done, 1 the API refused (its message is printed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from agentplane.agent.v1 import agent_pb2 as AP
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.client import AgentplaneClient
from agentplane.thread.v1 import thread_pb2 as TP
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_pb2 as UP
from agentplane.usage.v1 import usage_service_pb2 as U

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class UsageError(Exception):
    """Bad usage: exit code 2."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agentplane", description=__doc__.split("\n\n")[0])
    top.add_argument("--addr", help="host[:port] of the agent service (thread, usage: +1, +2)")
    top.add_argument("--token", help="API key or superuser token")
    top.add_argument("--json", action="store_true", help="JSON output for scripts")
    nouns = top.add_subparsers(dest="noun", required=True)

    agents = nouns.add_parser("agents").add_subparsers(dest="verb", required=True)
    listing = agents.add_parser("list")
    listing.add_argument("--project", default="-")
    listing.add_argument("--status", choices=["IDLE", "WORKING", "WAITING", "PAUSED", "TERMINATED"])
    for verb in ("get", "pause", "resume", "terminate"):
        agents.add_parser(verb).add_argument("agent_id")

    threads = nouns.add_parser("threads").add_subparsers(dest="verb", required=True)
    listing = threads.add_parser("list")
    listing.add_argument("--project", default="-")
    listing.add_argument("--status", choices=["ACTIVE", "COMPLETED", "FAILED", "KILLED"])
    threads.add_parser("tail").add_argument("thread_id")
    kill = threads.add_parser("kill")
    kill.add_argument("thread_id")
    kill.add_argument("--reason", default="")

    inject = nouns.add_parser("inject")
    inject.add_argument("agent_id")
    inject.add_argument("payload", help='a JSON object, e.g. \'{"text": "hi"}\'')
    inject.add_argument("--thread", default="")

    usage = nouns.add_parser("usage")
    usage.add_argument("--by", choices=["model", "agent"], default="model")
    usage.add_argument("--since", default="24h", help="e.g. 30m, 24h, 7d")
    usage.add_argument("--project", default="-")

    budgets = nouns.add_parser("budgets").add_subparsers(dest="verb", required=True)
    budgets.add_parser("list").add_argument("--project", required=True)
    create = budgets.add_parser("create")
    create.add_argument("--project", required=True)
    create.add_argument(
        "--scope", choices=["PROJECT", "AGENT", "MODEL", "API_KEY"], default="PROJECT"
    )
    create.add_argument("--scope-id", default="")
    create.add_argument("--limit-tokens", type=int, default=0)
    create.add_argument("--limit-usd", type=float, default=0.0)
    create.add_argument("--period", choices=["DAY", "WEEK", "MONTH", "LIFETIME"], default="DAY")
    create.add_argument("--time-zone", default="UTC")
    create.add_argument("--enforcement", choices=["HARD", "SOFT"], default="HARD")
    create.add_argument("--alerts", default="50,80,100", help="thresholds in percent")
    reset = budgets.add_parser("reset")
    reset.add_argument("--project", required=True)
    reset.add_argument("budget_id")
    return top


def token_of(args: argparse.Namespace) -> str:
    if args.token:
        return str(args.token)
    if os.environ.get("AGENTPLANE_TOKEN"):
        return os.environ["AGENTPLANE_TOKEN"]
    saved = Path(".admin-token")
    return saved.read_text().strip() if saved.is_file() else ""


def addresses(args: argparse.Namespace) -> dict[str, Any]:
    base = args.addr or os.environ.get("AGENTPLANE_ADDR", "")
    if not base:
        return {}  # the client's own defaults and AGENTPLANE_*_ADDR
    host, _, port = base.rpartition(":") if ":" in base else (base, "", "50051")
    if not port.isdigit():
        raise UsageError(f"--addr {base!r} must be HOST or HOST:PORT")
    first = int(port)
    return {
        f"{name}_addr": f"{host}:{first + i}" for i, name in enumerate(("agent", "thread", "usage"))
    }


def seconds(text: str) -> float:
    unit = text[-1:].lower()
    number = text[:-1] if unit in DURATION_UNITS else text
    try:
        return float(number) * DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise UsageError(f"{text!r} is not a duration (like 30m, 24h, 7d)") from None


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line([c.upper() for c in columns]), *(line(r) for r in cells)])


def short(value: str) -> str:
    """An enum's JSON name without its type's prefix: AGENT_STATUS_IDLE -> IDLE."""
    for prefix in ("AGENT_STATUS_", "THREAD_STATUS_", "BUDGET_SCOPE_", "BUDGET_PERIOD_",
                   "BUDGET_ENFORCEMENT_"):  # fmt: skip
        if value.startswith(prefix):
            return value[len(prefix) :]
    return value


class Commands:
    def __init__(self, client: AgentplaneClient, as_json: bool) -> None:
        self.client = client
        self.as_json = as_json

    def show(self, data: Any, rows: list[dict[str, Any]] | None = None,
             columns: Sequence[str] = ()) -> None:  # fmt: skip
        if self.as_json:
            print(json.dumps(data, indent=1))
        elif rows is not None:
            print(
                table(
                    [
                        {k: short(v) if isinstance(v, str) else v for k, v in r.items()}
                        for r in rows
                    ],
                    columns,
                )
            )
        else:
            for key, value in data.items():
                print(f"{key}: {short(value) if isinstance(value, str) else json.dumps(value)}")

    async def agents(self, args: argparse.Namespace) -> None:
        c = self.client
        if args.verb == "list":
            request = A.ListAgentsRequest(project_id=args.project, page_size=100)
            if args.status:
                request.status = AP.AgentStatus.Value(f"AGENT_STATUS_{args.status}")
            reply = as_dict(await c.call(c.agents.ListAgents, request))
            self.show(
                reply,
                reply.get("agents", []),
                ("id", "name", "status", "project_id", "tokens_used"),
            )
            return
        call, one = {
            "get": (c.agents.GetAgent, A.GetAgentRequest(agent_id=args.agent_id)),
            "pause": (c.agents.PauseAgent, A.PauseAgentRequest(agent_id=args.agent_id)),
            "resume": (c.agents.ResumeAgent, A.ResumeAgentRequest(agent_id=args.agent_id)),
            "terminate": (c.agents.TerminateAgent, A.TerminateAgentRequest(agent_id=args.agent_id)),
        }[args.verb]
        self.show(as_dict(await c.call(call, one)))

    async def threads(self, args: argparse.Namespace) -> None:
        c = self.client
        if args.verb == "list":
            request = T.ListThreadsRequest(project_id=args.project, page_size=100)
            if args.status:
                request.status = TP.ThreadStatus.Value(f"THREAD_STATUS_{args.status}")
            reply = as_dict(await c.call(c.threads.ListThreads, request))
            self.show(
                reply,
                reply.get("threads", []),
                ("id", "title", "status", "project_id", "message_count"),
            )
        elif args.verb == "kill":
            killed = await c.call(
                c.threads.KillThread,
                T.KillThreadRequest(thread_id=args.thread_id, reason=args.reason),
            )
            self.show(as_dict(killed))
        else:
            await self.tail(args.thread_id)

    async def tail(self, thread_id: str) -> None:
        """The thread's latest messages, then each new one, until the thread ends."""
        c = self.client
        got = await c.call(
            c.threads.GetThread, T.GetThreadRequest(thread_id=thread_id, message_limit=20)
        )
        stream = c.threads.WatchThread(
            T.WatchThreadRequest(thread_id=thread_id), metadata=c.metadata
        )
        for message in got.messages:
            self.message(as_dict(message))
        async for event in stream:
            if event.HasField("message"):
                self.message(as_dict(event.message))
            elif event.HasField("thread"):
                status = short(as_dict(event.thread).get("status", ""))
                print(
                    json.dumps({"thread": thread_id, "status": status})
                    if self.as_json
                    else f"-- thread {status}",
                    flush=True,
                )

    def message(self, m: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(m), flush=True)
        else:
            who = f"{m.get('from_agent')} -> {m.get('to_agent')}"
            body = json.dumps(m.get("payload", {}))
            print(f"{m.get('create_time', '')}  {who}: {body}", flush=True)

    async def inject(self, args: argparse.Namespace) -> None:
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            raise UsageError(f"payload is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise UsageError("payload must be a JSON object")
        request = T.InjectMessageRequest(
            to=args.agent_id, thread_id=args.thread, request_id=os.urandom(8).hex()
        )
        request.payload.update(payload)
        self.show(as_dict(await self.client.call(self.client.threads.InjectMessage, request)))

    async def usage(self, args: argparse.Namespace) -> None:
        c = self.client
        since = seconds(args.since)
        by_model = args.by == "model"
        request = U.GetUsageTimeSeriesRequest(
            project_id=args.project,
            group_by=UP.USAGE_GROUP_BY_MODEL if by_model else UP.USAGE_GROUP_BY_AGENT,
            granularity=UP.GRANULARITY_HOUR if since <= 7 * 86_400 else UP.GRANULARITY_DAY,
        )
        request.start_time.FromMilliseconds(int((time.time() - since) * 1000))
        reply = await c.call(c.usage_service.GetUsageTimeSeries, request)
        sums: dict[str, dict[str, float]] = {}
        for bucket in reply.buckets:
            row = sums.setdefault(
                bucket.group or "all", {"tokens": 0, "requests": 0, "cost_usd": 0.0}
            )
            row["tokens"] += bucket.totals.total_tokens
            row["requests"] += bucket.totals.request_count
            row["cost_usd"] += bucket.totals.total_cost_usd
        ordered = sorted(sums.items(), key=lambda kv: -kv[1]["tokens"])
        rows: list[dict[str, Any]] = [
            {args.by: g, **v, "cost_usd": round(v["cost_usd"], 6)} for g, v in ordered
        ]
        self.show(
            {"since": args.since, "by": args.by, "groups": rows},
            rows,
            (args.by, "tokens", "requests", "cost_usd"),
        )

    async def budgets(self, args: argparse.Namespace) -> None:
        c = self.client
        if args.verb == "list":
            reply = as_dict(
                await c.call(
                    c.usage_service.ListBudgets,
                    U.ListBudgetsRequest(project_id=args.project, page_size=100),
                )
            )
            self.show(
                reply,
                reply.get("budgets", []),
                (
                    "budget_id",
                    "scope",
                    "scope_id",
                    "period",
                    "enforcement",
                    "used_tokens",
                    "limit_tokens",
                    "percent_used",
                ),
            )
        elif args.verb == "reset":
            self.show(
                as_dict(
                    await c.call(
                        c.usage_service.ResetBudget,
                        U.ResetBudgetRequest(project_id=args.project, budget_id=args.budget_id),
                    )
                )
            )
        else:
            try:
                thresholds = [int(t) for t in args.alerts.split(",") if t]
            except ValueError:
                raise UsageError("--alerts must be whole percentages, e.g. 50,80,100") from None
            budget = UP.Budget(
                scope=UP.BudgetScope.Value(f"BUDGET_SCOPE_{args.scope}"), scope_id=args.scope_id,
                limit_tokens=args.limit_tokens, limit_cost_micros=round(args.limit_usd * 1e6),
                period=UP.BudgetPeriod.Value(f"BUDGET_PERIOD_{args.period}"),
                time_zone=args.time_zone,
                enforcement=UP.BudgetEnforcement.Value(f"BUDGET_ENFORCEMENT_{args.enforcement}"),
                alert_thresholds=thresholds,
            )  # fmt: skip
            made = await c.call(
                c.usage_service.CreateBudget,
                U.CreateBudgetRequest(project_id=args.project, budget=budget),
            )
            self.show(as_dict(made))


async def run(args: argparse.Namespace) -> None:
    async with AgentplaneClient(token=token_of(args), **addresses(args)) as client:
        commands = Commands(client, args.json)
        await getattr(commands, args.noun)(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # bad usage: argparse prints it and exits 2
    try:
        asyncio.run(run(args))
    except UsageError as exc:
        print(f"agentplane: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"agentplane: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
