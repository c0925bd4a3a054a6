"""Python client for Tessera nodes (sync and asyncio).

Generated stubs live in `tessera_client.pb`.
"""

from tessera_client._channel import (
    KEEPALIVE_TIME_MS,
    AsyncClient,
    AsyncFollowingChannel,
    Client,
    CredentialPaths,
    Credentials,
    FollowingChannel,
)

__all__ = [
    "KEEPALIVE_TIME_MS",
    "AsyncClient",
    "AsyncFollowingChannel",
    "Client",
    "CredentialPaths",
    "Credentials",
    "FollowingChannel",
]
