"""`agentplane`: the operators' command line.

    agentplane agents list|get|pause|resume|terminate
    agentplane threads list|tail|kill
    agentplane inject AGENT JSON
    agentplane usage [--by model|agent] [--since 24h]
    agentplane budgets list|create|reset
    agentplane calls list --project P [--agent A] [--thread T] [--model M] [--outcome O]

Tables by default, `--json` for scripts (the API's message: every field, 64-bit numbers as
numbers, `[]` for an empty list). Options go before or after the command. Where the
services are: `--agent-addr`, `--thread-addr`, `--usage-addr` (or AGENTPLANE_AGENT_ADDR…,
or the services' own AGENT_SVC_ADDR, THREAD_SVC_ADDR, USAGE_SVC_ADDR); `--addr HOST[:PORT]`
(or AGENTPLANE_ADDR) is the local shorthand for the agent service on PORT and the thread
and usage services on PORT+1 and PORT+2 (default localhost:50051). The token: `--token`,
AGENTPLANE_TOKEN, or `.admin-token` in the working directory. Exit codes: 0 done, 1 the
API refused (its message is printed), 2 bad usage; output cut short by a closed pipe
(`| head`) ends quietly with 141, as Unix tools do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from agentplane.agent.v1 import agent_pb2 as AP
from agentplane.agent.v1 import agent_service_pb2 as A
from agentplane.client import AgentplaneClient
from agentplane.thread.v1 import thread_pb2 as TP
from agentplane.thread.v1 import thread_service_pb2 as T
from agentplane.usage.v1 import usage_pb2 as UP
from agentplane.usage.v1 import usage_service_pb2 as U

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
MAX_SINCE_S = 400 * 86_400  # daily buckets are kept 400 days
MAX_LIMIT_TOKENS = 10**12  # the API's own bound on a budget's tokens (and requests)
MAX_IN_FLIGHT = 100_000  # and on its reservations open at once


class UsageError(Exception):
    """Bad usage: exit code 2."""


def _upper(text: str) -> str:
    return text.upper()


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of at least 0")
    return value


def _whole(most: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not 0 <= value <= most:
            raise argparse.ArgumentTypeError(f"{text} is not between 0 and {most}")
        return value

    return parse


def common_options() -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Defaults are kept off
    the subcommands (SUPPRESS), so a value given anywhere survives."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--addr",
        default=argparse.SUPPRESS,
        help="HOST[:PORT] of the agent service; thread and usage on +1, +2",
    )
    for name in ("agent", "thread", "usage"):
        common.add_argument(
            f"--{name}-addr", default=argparse.SUPPRESS, help=f"HOST:PORT of the {name} service"
        )
    common.add_argument("--token", default=argparse.SUPPRESS, help="API key or superuser token")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="JSON output for scripts")  # fmt: skip
    return common


def parser() -> argparse.ArgumentParser:
    common = common_options()
    # The top parser gets actions of its own: set_defaults below changes the defaults of
    # the actions it holds, which must stay SUPPRESS on the subcommands.
    top = argparse.ArgumentParser(
        prog="agentplane", description=__doc__.split("\n\n")[0], parents=[common_options()]
    )
    top.set_defaults(addr=None, agent_addr=None, thread_addr=None, usage_addr=None,
                     token=None, json=False)  # fmt: skip
    nouns = top.add_subparsers(dest="noun", required=True)

    def command(group: Any, name: str) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=[common])

    def verbs(name: str) -> Any:
        return command(nouns, name).add_subparsers(dest="verb", required=True)

    agents = verbs("agents")
    listing = command(agents, "list")
    listing.add_argument("--project", default="-")
    statuses = ["IDLE", "WORKING", "WAITING", "PAUSED", "TERMINATED"]
    listing.add_argument("--status", type=_upper, choices=statuses)
    for verb in ("get", "pause", "resume", "terminate"):
        command(agents, verb).add_argument("agent_id")

    threads = verbs("threads")
    listing = command(threads, "list")
    listing.add_argument("--project", default="-")
    listing.add_argument("--status", type=_upper,
                         choices=["ACTIVE", "COMPLETED", "FAILED", "KILLED"])  # fmt: skip
    command(threads, "tail").add_argument("thread_id")
    kill = command(threads, "kill")
    kill.add_argument("thread_id")
    kill.add_argument("--reason", default="")

    inject = command(nouns, "inject")
    inject.add_argument("agent_id")
    inject.add_argument("payload", help='a JSON object, e.g. \'{"text": "hi"}\'')
    inject.add_argument("--thread", default="")

    usage = command(nouns, "usage")
    usage.add_argument("--by", type=str.lower, choices=["model", "agent"], default="model")
    usage.add_argument("--since", default="24h", help="e.g. 30m, 24h, 7d (at most 400d)")
    usage.add_argument("--project", default="-")

    budgets = verbs("budgets")
    command(budgets, "list").add_argument("--project", required=True)
    create = command(budgets, "create")
    create.add_argument("--project", required=True)
    create.add_argument("--scope", type=_upper, default="PROJECT",
                        choices=["PROJECT", "AGENT", "MODEL", "API_KEY", "THREAD"])  # fmt: skip
    create.add_argument("--scope-id", default="")
    create.add_argument("--limit-tokens", type=_whole(MAX_LIMIT_TOKENS), default=0)
    create.add_argument("--limit-usd", type=_finite, default=0.0)
    create.add_argument("--limit-requests", type=_whole(MAX_LIMIT_TOKENS), default=0)
    create.add_argument("--max-in-flight", type=_whole(MAX_IN_FLIGHT), default=0)
    create.add_argument("--period", type=_upper, default="DAY",
                        choices=["DAY", "WEEK", "MONTH", "LIFETIME", "MINUTE", "HOUR"])  # fmt: skip
    create.add_argument("--time-zone", default="UTC")
    create.add_argument("--enforcement", type=_upper, choices=["HARD", "SOFT"], default="HARD")
    create.add_argument("--alerts", default="50,80,100", help="thresholds in percent")
    reset = command(budgets, "reset")
    reset.add_argument("--project", required=True)
    reset.add_argument("budget_id")

    calls = verbs("calls")
    listing = command(calls, "list")
    listing.add_argument("--project", required=True)
    listing.add_argument("--agent", default="")
    listing.add_argument("--thread", default="")
    listing.add_argument("--model", default="")
    outcomes = ["OK", "REFUSED", "UPSTREAM_ERROR", "CANCELLED", "TIMEOUT"]
    listing.add_argument("--outcome", type=_upper, default=None, choices=outcomes)
    listing.add_argument("--limit", type=_whole(100), default=50)
    return top


def token_of(args: argparse.Namespace) -> str:
    """The token from --token, AGENTPLANE_TOKEN or ./.admin-token (whitespace stripped);
    bad usage when none of them has one, saying where it looked."""
    saved = Path(".admin-token")
    found = (
        args.token
        or os.environ.get("AGENTPLANE_TOKEN", "")
        or (saved.read_text() if saved.is_file() else "")
    ).strip()
    if not found:
        raise UsageError(
            "no token: give --token, set AGENTPLANE_TOKEN, or run where .admin-token is "
            f"(looked for {saved.resolve()})"
        )
    return found


def _host_port(flag: str, value: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:  # no port (an IPv6 literal in brackets ends with "]")
        host, port = value, str(default_port or "")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise UsageError(f"{flag} {value!r} must be HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def addresses(args: argparse.Namespace) -> dict[str, Any]:
    """Per-service flags first, then --addr / AGENTPLANE_ADDR (PORT, +1, +2); whatever is
    left to the client's own defaults (AGENTPLANE_<S>_ADDR, <S>_SVC_ADDR, localhost)."""
    chosen: dict[str, Any] = {}
    base = args.addr or os.environ.get("AGENTPLANE_ADDR", "")
    if base:
        host, first = _host_port("--addr", base, 50051)
        if first + 2 > 65535:
            raise UsageError(f"--addr {base!r}: the usage service would be past port 65535")
        chosen = {f"{n}_addr": f"{host}:{first + i}"
                  for i, n in enumerate(("agent", "thread", "usage"))}  # fmt: skip
    for name in ("agent", "thread", "usage"):
        given = getattr(args, f"{name}_addr")
        if given:
            if not given.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):  # grpc's schemes
                _host_port(f"--{name}-addr", given)
            chosen[f"{name}_addr"] = given
    return chosen


def seconds(text: str) -> float:
    unit = text[-1:].lower()
    number = text[:-1] if unit in DURATION_UNITS else text
    try:
        value = float(number) * DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise UsageError(f"{text!r} is not a duration (like 30m, 24h, 7d)") from None
    if not 0 < value <= MAX_SINCE_S:  # NaN fails this too
        raise UsageError(f"{text!r} is not a duration from 1s to 400d")
    return value


INT64 = {
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
}  # fmt: skip


def as_dict(message: Message) -> dict[str, Any]:
    """The message as the API has it: every field (zeros and `[]` included), proto field
    names, 64-bit integers as numbers (protobuf's JSON writes them as strings)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, data)


def _numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        value = data.get(field.name)
        if value is None:
            continue
        if field.type in INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and field.message_type.full_name.startswith(
            "agentplane."
        ):
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    _numbers(field.message_type, item)
    return data


def decimal(value: float) -> str:
    """A float as a plain decimal: 0.000021, never 2.1e-05."""
    if not math.isfinite(value):
        return "null"
    text = repr(value)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text


def to_json(data: Any, indent: int = 1, depth: int = 0) -> str:
    """JSON with floats as plain decimals (json.dumps would write 2.1e-05)."""
    pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
    if isinstance(data, dict):
        if not data:
            return "{}"
        body = ",\n".join(
            f"{inner}{json.dumps(str(k))}: {to_json(v, indent, depth + 1)}" for k, v in data.items()
        )
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(data, list | tuple):
        if not data:
            return "[]"
        body = ",\n".join(inner + to_json(v, indent, depth + 1) for v in data)
        return "[\n" + body + "\n" + pad + "]"
    if isinstance(data, float):
        return decimal(data)
    return json.dumps(data)


def cell(value: Any) -> str:
    if isinstance(value, float):
        return decimal(value)
    if isinstance(value, str):
        return short(value)
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
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
            print(to_json(data))
        elif rows is not None:
            print(table(rows, columns))
        else:
            for key, value in data.items():
                shown = cell(value) if isinstance(value, str | float) else to_json(value, 0)
                print(f"{key}: {shown.replace(chr(10), '')}")

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
                ("id", "title", "status", "project_id", "message_count", "end_reason"),
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
                ended = as_dict(event.thread)
                status, reason = short(ended.get("status", "")), ended.get("end_reason", "")
                print(
                    to_json(
                        {"thread": thread_id, "status": status, "end_reason": reason}, 0
                    ).replace("\n", "")
                    if self.as_json
                    else f"-- thread {status}" + (f": {reason}" if reason else ""),
                    flush=True,
                )

    def message(self, m: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(m, separators=(",", ":")), flush=True)
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

    async def calls(self, args: argparse.Namespace) -> None:
        await _calls_list(self, args)

    async def budgets(self, args: argparse.Namespace) -> None:
        c = self.client
        if args.verb == "list":
            reply = as_dict(
                await c.call(
                    c.usage_service.ListBudgets,
                    U.ListBudgetsRequest(project_id=args.project, page_size=100),
                )
            )
            rows = [
                {**b, "used_usd": b["used_cost_micros"] / 1e6,
                 "limit_usd": b["limit_cost_micros"] / 1e6}
                for b in reply["budgets"]
            ]  # fmt: skip
            self.show(
                reply,
                rows,
                (
                    "budget_id",
                    "scope",
                    "scope_id",
                    "period",
                    "enforcement",
                    "used_tokens",
                    "limit_tokens",
                    "used_usd",
                    "limit_usd",
                    "used_requests",
                    "limit_requests",
                    "in_flight",
                    "max_in_flight",
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
                thresholds = [-1]
            if not all(0 < t <= 1000 for t in thresholds):
                raise UsageError("--alerts must be whole percentages from 1 to 1000, e.g. 50,80")
            budget = UP.Budget(
                scope=UP.BudgetScope.Value(f"BUDGET_SCOPE_{args.scope}"), scope_id=args.scope_id,
                limit_tokens=args.limit_tokens, limit_cost_micros=round(args.limit_usd * 1e6),
                limit_requests=args.limit_requests, max_in_flight=args.max_in_flight,
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


async def _calls_list(commands: Commands, args: argparse.Namespace) -> None:
    """The model gateway's call log, newest first."""
    c = commands.client
    outcome = UP.ModelCallOutcome.Value(f"MODEL_CALL_OUTCOME_{args.outcome or 'UNSPECIFIED'}")
    reply = as_dict(await c.call(c.usage_service.ListModelCalls, U.ListModelCallsRequest(
        project_id=args.project, agent_id=args.agent, thread_id=args.thread, model=args.model,
        outcome=outcome, page_size=args.limit,
    )))  # fmt: skip
    rows = [
        {**call, "tokens": call.get("usage", {}).get("total_tokens", 0),
         "cost_usd": call.get("usage", {}).get("total_cost_micros", 0) / 1e6,
         "ttft_ms": _millis(call.get("time_to_first_token", "")),
         "duration_ms": _millis(call.get("duration", ""))}
        for call in reply["calls"]
    ]  # fmt: skip
    commands.show(reply, rows, ("start_time", "agent_id", "model_requested", "outcome", "reason",
                                "http_status", "tokens", "cost_usd", "estimated", "ttft_ms",
                                "duration_ms"))  # fmt: skip


def _millis(duration: str) -> int:
    """'1.250s' (a Duration in JSON) as whole milliseconds."""
    return round(float(duration.removesuffix("s")) * 1000) if duration else 0


async def run(args: argparse.Namespace) -> None:
    async with AgentplaneClient(token=token_of(args), **addresses(args)) as client:
        commands = Commands(client, args.json)
        await getattr(commands, args.noun)(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)  # bad usage: argparse prints it and exits 2
    try:
        asyncio.run(run(args))
        sys.stdout.flush()
    except UsageError as exc:
        print(f"agentplane: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"agentplane: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went (`| head`): nothing more to say, and nothing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 0
    return 0
