"""Mutual TLS credentials from TLS_CERT, TLS_KEY and TLS_CA.

A server that has them requires a client certificate signed by the CA; a client presents
its own certificate and trusts only that CA. Without them, plaintext, with a warning.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common.settings import Settings


def _material(settings: Settings) -> tuple[bytes, bytes, bytes]:
    return (
        Path(settings.tls_key).read_bytes(),
        Path(settings.tls_cert).read_bytes(),
        Path(settings.tls_ca).read_bytes(),
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    key, cert, ca = _material(settings)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def client_credentials(settings: Settings) -> grpc.ChannelCredentials:
    key, cert, ca = _material(settings)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
