"""Channels and stubs for calling a Tessera node over mutual TLS.

Credentials read from files follow certificate renewal: before a call, the client
checks (at most every `reload_interval_s`) whether the files changed; if they did and
they hold a matching key and certificate, it opens a new channel with them for new
calls. grpcio channels cannot reload certificates in place, so the old channel is
closed only after `close_grace_s`, letting the calls already on it finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from tessera_client.pb import (
    admin_pb2_grpc,
    command_pb2_grpc,
    events_pb2_grpc,
    query_pb2_grpc,
)

log = logging.getLogger(__name__)

#: Seconds between checks of the credential files (a stat of three files).
RELOAD_INTERVAL_S = 1.0
#: Seconds a replaced channel stays open so the calls on it can finish.
CLOSE_GRACE_S = 60.0

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class CredentialPaths:
    """Where a client identity's PEM files are, to read them again after a renewal."""

    ca: Path
    cert: Path
    key: Path

    def stamp(self) -> _Stamp:
        """Changes whenever one of the files is replaced or rewritten."""
        out = []
        for p in (self.ca, self.cert, self.key):
            st = os.stat(p)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)


@dataclass(frozen=True)
class Credentials:
    """PEM material of one client identity and the roots it trusts."""

    ca_pem: bytes
    cert_pem: bytes
    #: Never shown by repr(): a logged or asserted Credentials must not leak the key.
    key_pem: bytes = field(repr=False)
    #: Set by `from_files`: clients then follow changes of these files (renewals).
    paths: CredentialPaths | None = field(default=None, compare=False)

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path) -> Credentials:
        """Read the three PEM files; clients made with the result follow their renewal."""
        paths = CredentialPaths(Path(ca), Path(cert), Path(key))
        return cls(paths.ca.read_bytes(), paths.cert.read_bytes(), paths.key.read_bytes(),
                   paths)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials presenting this client certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem, private_key=self.key_pem, certificate_chain=self.cert_pem
        )

    def matches(self) -> bool:
        """True when the key belongs to the leaf certificate (a consistent pair)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            leaf = x509.load_pem_x509_certificates(self.cert_pem)[0]
            key = serialization.load_pem_private_key(self.key_pem, password=None)
            x509.load_pem_x509_certificates(self.ca_pem)
        except (ValueError, TypeError, IndexError):
            return False
        return bool(leaf.public_key() == key.public_key())


class _Follower:
    """Decides when the credential files changed and reads them again, consistently."""

    def __init__(self, creds: Credentials, interval_s: float) -> None:
        self.creds = creds
        self.interval_s = interval_s
        self._next_check = time.monotonic() + interval_s
        self._stamp: _Stamp | None = None
        if creds.paths is not None:
            with contextlib.suppress(OSError):
                self._stamp = creds.paths.stamp()

    def due(self) -> bool:
        """True when the files should be looked at again."""
        return self.creds.paths is not None and time.monotonic() >= self._next_check

    def changed(self) -> Credentials | None:
        """New credentials when the files changed to a usable pair, else None."""
        paths = self.creds.paths
        if paths is None:
            return None
        now = time.monotonic()
        if now < self._next_check:
            return None
        self._next_check = now + self.interval_s
        try:
            stamp = paths.stamp()
            if stamp == self._stamp:
                return None
            fresh = Credentials.from_files(paths.ca, paths.cert, paths.key)
        except OSError:
            return None  # mid-replace or gone: keep the current channel, look again later
        if not fresh.matches():
            # A renewal that replaces key and certificate renames one after the other:
            # in between the pair does not match. Keep what works and look again.
            return None
        self._stamp = stamp
        if (fresh.ca_pem, fresh.cert_pem, fresh.key_pem) == (
                self.creds.ca_pem, self.creds.cert_pem, self.creds.key_pem):
            return None
        self.creds = fresh
        return fresh


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


C = TypeVar("C")


class _FollowingChannelBase(Generic[C]):
    """A channel stand-in for generated stubs that always calls on the current channel."""

    def __init__(self, make: Callable[[Credentials], C], creds: Credentials,
                 reload_interval_s: float, close_grace_s: float) -> None:
        self._make = make
        self._follower = _Follower(creds, reload_interval_s)
        self._lock = threading.Lock()
        self.close_grace_s = close_grace_s
        self.current: C = make(creds)
        self.generation = 0
        self._callables: dict[tuple[str, str, tuple[tuple[str, Any], ...]], tuple[int, Any]] = {}

    @property
    def credentials(self) -> Credentials:
        """The credentials new calls present."""
        return self._follower.creds

    def _refresh(self) -> None:
        if not self._follower.due():
            return  # the common case, without taking the lock
        with self._lock:
            fresh = self._follower.changed()
            if fresh is None:
                return
            old, self.current = self.current, self._make(fresh)
            self.generation += 1
        log.info("client credentials changed (%s): new calls use a new channel",
                 fresh.paths.cert if fresh.paths else "?")
        self._retire(old)

    def _retire(self, old: C) -> None:
        raise NotImplementedError

    def _callable(self, kind: str, method: str, kwargs: dict[str, Any]) -> Any:
        self._refresh()
        # The serializers are part of the key: one path may be called typed and raw.
        key = (kind, method, tuple(sorted(kwargs.items())))
        held = self._callables.get(key)
        if held is not None and held[0] == self.generation:
            return held[1]
        fn = getattr(self.current, kind)(method, **kwargs)
        self._callables[key] = (self.generation, fn)
        return fn

    def _multi(self, kind: str, method: str, **kwargs: Any) -> _MultiCallable:
        return _MultiCallable(self, kind, method, kwargs)

    def unary_unary(self, method: str, **kwargs: Any) -> _MultiCallable:
        """Like grpc's, resolved against the current channel at each call."""
        return self._multi("unary_unary", method, **kwargs)

    def unary_stream(self, method: str, **kwargs: Any) -> _MultiCallable:
        """Like grpc's, resolved against the current channel at each call."""
        return self._multi("unary_stream", method, **kwargs)

    def stream_unary(self, method: str, **kwargs: Any) -> _MultiCallable:
        """Like grpc's, resolved against the current channel at each call."""
        return self._multi("stream_unary", method, **kwargs)

    def stream_stream(self, method: str, **kwargs: Any) -> _MultiCallable:
        """Like grpc's, resolved against the current channel at each call."""
        return self._multi("stream_stream", method, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # channel_ready, get_state, subscribe ...: the current channel's.
        return getattr(self.current, name)


class _MultiCallable:
    """What a stub holds per method; each invocation goes to the current channel."""

    def __init__(self, owner: _FollowingChannelBase[Any], kind: str, method: str,
                 kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._kwargs = kwargs

    def _fn(self) -> Any:
        return self._owner._callable(self._kind, self._method, self._kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        """Sync stubs: response and call."""
        return self._fn().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        """Sync stubs: a future."""
        return self._fn().future(*args, **kwargs)


class FollowingChannel(_FollowingChannelBase[grpc.Channel]):
    """A blocking channel that follows credential files (see the module docstring)."""

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None,
                 reload_interval_s: float = RELOAD_INTERVAL_S,
                 close_grace_s: float = CLOSE_GRACE_S) -> None:
        opts = _options(server_name)
        self._timers: list[threading.Timer] = []
        super().__init__(
            lambda c: grpc.secure_channel(address, c.channel_credentials(), options=opts),
            creds, reload_interval_s, close_grace_s)

    def _retire(self, old: grpc.Channel) -> None:
        # grpc.Channel.close() cancels the calls on it at once: wait out the grace first.
        timer = threading.Timer(self.close_grace_s, old.close)
        timer.daemon = True
        timer.start()
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]

    def close(self) -> None:
        """Close the current channel and any replaced one still open."""
        for timer in self._timers:
            timer.cancel()
            timer.function()
        self._timers.clear()
        self.current.close()


class AsyncFollowingChannel(_FollowingChannelBase[grpc.aio.Channel]):
    """An asyncio channel that follows credential files (see the module docstring)."""

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None,
                 reload_interval_s: float = RELOAD_INTERVAL_S,
                 close_grace_s: float = CLOSE_GRACE_S) -> None:
        opts = _options(server_name)
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: list[grpc.aio.Channel] = []
        super().__init__(
            lambda c: grpc.aio.secure_channel(address, c.channel_credentials(), options=opts),
            creds, reload_interval_s, close_grace_s)

    def _retire(self, old: grpc.aio.Channel) -> None:
        # close(grace) refuses new calls on `old` and lets its in-flight calls finish.
        self._retired.append(old)
        task = asyncio.get_running_loop().create_task(self._close_later(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_later(self, old: grpc.aio.Channel) -> None:
        await old.close(grace=self.close_grace_s)
        with contextlib.suppress(ValueError):
            self._retired.remove(old)

    async def __aenter__(self) -> AsyncFollowingChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Close the current channel and every replaced one."""
        for old in list(self._retired):
            await old.close(grace)
        for task in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.current.close(grace)


class _Stubs:
    """The stubs of every Tessera service, on one channel."""

    def _bind_stubs(self, channel: Any) -> None:
        self.query = query_pb2_grpc.QueryServiceStub(channel)
        self.command = command_pb2_grpc.CommandServiceStub(channel)
        self.events = events_pb2_grpc.EventServiceStub(channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)


class AsyncClient(_Stubs):
    """Async stubs for every Tessera service over one mTLS channel.

    With `Credentials.from_files` the client follows renewal of those files: new calls
    use the new certificate, calls in flight finish on the old channel.
    """

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None,
                 reload_interval_s: float = RELOAD_INTERVAL_S,
                 close_grace_s: float = CLOSE_GRACE_S) -> None:
        self.channel = AsyncFollowingChannel(address, creds, server_name=server_name,
                                             reload_interval_s=reload_interval_s,
                                             close_grace_s=close_grace_s)
        self._bind_stubs(self.channel)

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Client(_Stubs):
    """Blocking stubs for every Tessera service over one mTLS channel.

    With `Credentials.from_files` the client follows renewal of those files, as
    `AsyncClient` does.
    """

    def __init__(self, address: str, creds: Credentials, *, server_name: str | None = None,
                 reload_interval_s: float = RELOAD_INTERVAL_S,
                 close_grace_s: float = CLOSE_GRACE_S) -> None:
        self.channel = FollowingChannel(address, creds, server_name=server_name,
                                        reload_interval_s=reload_interval_s,
                                        close_grace_s=close_grace_s)
        self._bind_stubs(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
