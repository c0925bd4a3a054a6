"""Channels and stubs for calling a Tessera node over mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tessera_client.pb import (
    admin_pb2_grpc,
    command_pb2_grpc,
    events_pb2_grpc,
    query_pb2_grpc,
)


@dataclass(frozen=True)
class Credentials:
    """PEM material of one client identity and the roots it trusts."""

    ca_pem: bytes
    cert_pem: bytes
    #: Never shown by repr(): a logged or asserted Credentials must not leak the key.
    key_pem: bytes = field(repr=False)

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path) -> Credentials:
        """Read the three PEM files."""
        return cls(Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes())

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials presenting this client certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )


#: Keepalive pings on idle channels: above the 30 s minimum a Tessera node enforces
#: (`grpc.min_ping_interval_ms`), so a node never counts them as strikes.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def _options(server_name: str | None) -> list[tuple[str, str | int]]:
    opts: list[tuple[str, str | int]] = [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return opts


class AsyncClient:
    """Async stubs for every Tessera service over one mTLS channel.

    grpcio channels cannot reload certificates: after a rotation, make a new client.
    """

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None) -> None:
        self.channel = grpc.aio.secure_channel(
            address, creds.channel_credentials(), options=_options(server_name)
        )
        self.query = query_pb2_grpc.QueryServiceStub(self.channel)
        self.command = command_pb2_grpc.CommandServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client:
    """Blocking stubs for every Tessera service over one mTLS channel."""

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None) -> None:
        self.channel = grpc.secure_channel(
            address, creds.channel_credentials(), options=_options(server_name)
        )
        self.query = query_pb2_grpc.QueryServiceStub(self.channel)
        self.command = command_pb2_grpc.CommandServiceStub(self.channel)
        self.events = events_pb2_grpc.EventServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
