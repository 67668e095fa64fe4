"""Channels and stubs for calling the other services, created once per process."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from agentplane.agent.v1 import agent_service_pb2_grpc
from agentplane.channel_options import CHANNEL_OPTIONS  # the SDK's keep-alives too
from agentplane.thread.v1 import thread_service_pb2_grpc
from agentplane.usage.v1 import usage_service_pb2_grpc
from services.common import registry
from services.common.interceptors import ForwardingStreamInterceptor, ForwardingUnaryInterceptor
from services.common.settings import Settings
from services.common.tls import client_credentials


def open_channel(settings: Settings, address: str, forwarding: bool = True) -> grpc.aio.Channel:
    """A channel to a peer: mutual TLS when configured, plaintext otherwise. With
    `forwarding`, calls made while serving an RPC carry that caller's token, trace context
    and deadline (a caller that sets them itself, like the gateway, can do without)."""
    secret = settings.admin_token  # signs the proof that a call is forwarded by a service
    interceptors = (
        [ForwardingUnaryInterceptor(secret), ForwardingStreamInterceptor(secret)]
        if forwarding
        else []
    )
    if settings.tls_enabled:
        return grpc.aio.secure_channel(
            address, client_credentials(settings), options=CHANNEL_OPTIONS,
            interceptors=interceptors,
        )  # fmt: skip
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


@dataclass
class PeerClients:
    """Stubs for the three services; channels connect lazily, on first use."""

    agent: agent_service_pb2_grpc.AgentServiceStub
    thread: thread_service_pb2_grpc.ThreadServiceStub
    usage: usage_service_pb2_grpc.UsageServiceStub
    channels: list[grpc.aio.Channel]

    @classmethod
    def connect(cls, settings: Settings) -> PeerClients:
        agent, thread, usage = (
            open_channel(settings, settings.peer_address(service)) for service in registry.SERVICES
        )
        return cls(
            agent=agent_service_pb2_grpc.AgentServiceStub(agent),
            thread=thread_service_pb2_grpc.ThreadServiceStub(thread),
            usage=usage_service_pb2_grpc.UsageServiceStub(usage),
            channels=[agent, thread, usage],
        )

    @property
    def agent_channel(self) -> grpc.aio.Channel:
        return self.channels[0]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
