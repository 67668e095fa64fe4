"""The processes of agentplane, in one place: name, entry point, default ports and the
variable that tells the others where each one is. `make run`, the settings' defaults, the
peer clients, the gateway and the tests all read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Process:
    name: str  # "agent"
    label: str  # service_name in settings, logs and metrics: "agent_svc"
    module: str  # `python -m <module>`
    port: int  # default GRPC_PORT (HTTP_PORT for the gateway)
    metrics_port: int  # default METRICS_PORT
    address_env: str = ""  # where peers find it ("" for the gateway: nobody calls it)

    @property
    def default_address(self) -> str:
        return f"localhost:{self.port}"


AGENT = Process("agent", "agent_svc", "services.agent_svc", 50051, 9101, "AGENT_SVC_ADDR")
THREAD = Process("thread", "thread_svc", "services.thread_svc", 50052, 9102, "THREAD_SVC_ADDR")
USAGE = Process("usage", "usage_svc", "services.usage_svc", 50053, 9103, "USAGE_SVC_ADDR")
GATEWAY = Process("gateway", "gateway", "gateway", 8080, 9104)
MODELS = Process("models", "model_gateway", "gateway.models", 8090, 9105)

SERVICES = (AGENT, THREAD, USAGE)  # the gRPC services, in the order they start
PROCESSES = (*SERVICES, GATEWAY, MODELS)
REDIS_PORT = 6379
