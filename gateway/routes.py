"""The routing table, built from the services' `google.api.http` annotations.

Every RPC's rule and its `additional_bindings` become routes: a verb, a path template
(`/api/v1/projects/{project_id}/agents/{agent_id}:pause`), where the body goes, and the
method to call. A new annotated RPC gets its route with no gateway change.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from agentplane.agent.v1 import agent_service_pb2
from agentplane.thread.v1 import thread_service_pb2
from agentplane.usage.v1 import usage_service_pb2

SERVICES: dict[str, ServiceDescriptor] = {
    "agent": agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "thread": thread_service_pb2.DESCRIPTOR.services_by_name["ThreadService"],
    "usage": usage_service_pb2.DESCRIPTOR.services_by_name["UsageService"],
}
VERBS = ("get", "put", "post", "delete", "patch")
_VARIABLE = re.compile(r"\{([\w.]+)(?:=[^}]*)?\}")


@dataclass(frozen=True)
class Route:
    verb: str  # upper case
    template: str
    body: str  # "", "*" or a field name
    backend: str  # "agent" | "thread" | "usage"
    method: MethodDescriptor
    binding: int  # 0 for the main rule, then 1.. for additional bindings
    variables: tuple[str, ...] = field(default=())
    pattern: re.Pattern[str] = field(default=re.compile(""))

    @functools.cached_property
    def prefix(self) -> str:
        """The template's literal start (up to its first variable): a path that does not
        start with it cannot match, which a string test tells faster than the pattern."""
        return self.template.split("{", 1)[0].split(":", 1)[0]

    @property
    def rpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def resume_field(self) -> str:
        """For a stream that can resume: the id field of its events (`alert_id`) whose
        request has `after_<it>`; SSE sends it as `id:` and takes back `Last-Event-ID`."""
        if not self.streaming:
            return ""
        for name in self.method.output_type.fields_by_name:
            if f"after_{name}" in self.method.input_type.fields_by_name:
                return str(name)
        return ""

    @property
    def operation_id(self) -> str:
        suffix = f"_{self.binding}" if self.binding else ""
        return f"{self.method.containing_service.name}_{self.method.name}{suffix}"

    def specificity(self) -> tuple[int, int]:
        """Literal text first: /agents/metrics before /agents/{agent_id}."""
        literal = _VARIABLE.sub("", self.template)
        return (-len(literal.strip("/").split("/")), -len(literal))


def _compile(template: str) -> tuple[tuple[str, ...], re.Pattern[str]]:
    variables: list[str] = []
    regex, position = "", 0
    for match in _VARIABLE.finditer(template):
        regex += re.escape(template[position : match.start()])
        variables.append(match.group(1))
        regex += f"(?P<v{len(variables) - 1}>[^/]+?)"
        position = match.end()
    regex += re.escape(template[position:])
    return tuple(variables), re.compile(f"^{regex}$")


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def build_routes(services: dict[str, ServiceDescriptor] | None = None) -> list[Route]:
    routes: list[Route] = []
    for backend, service in (services or SERVICES).items():
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for index, binding in enumerate(_bindings(rule)):
                verb = binding.WhichOneof("pattern")
                if verb not in VERBS:
                    continue
                template = getattr(binding, verb)
                variables, pattern = _compile(template)
                routes.append(
                    Route(
                        verb.upper(),
                        template,
                        binding.body,
                        backend,
                        method,
                        index,
                        variables,
                        pattern,
                    )
                )
    return sorted(routes, key=lambda r: r.specificity())


def match(
    routes: Sequence[Route], verb: str, path: str
) -> tuple[Route | None, dict[str, str], bool]:
    """(route, path variables, whether the path exists with another verb)."""
    path_known = False
    for route in routes:
        if not path.startswith(route.prefix):
            continue
        found = route.pattern.match(path)
        if not found:
            continue
        if route.verb != verb:
            path_known = True
            continue
        values = {name: found.group(f"v{i}") for i, name in enumerate(route.variables)}
        return route, values, True
    return None, {}, path_known
