"""Calling peers for a fanned-out query: deadlines, circuit breakers, the offline cache.

Each peer gets its own deadline and breaker. Answers of `get` and `list` are cached in
Valkey on this (calling) node, keyed by the peer, the identity and certificate this node
holds on it (which stand for the grant it was given), the verb, the kind and a hash of
the request. The cache is a fallback, never a shortcut: a reachable peer is always
asked, so a grant revoked on the peer takes effect on the very next call and is never
answered from cache. A peer that refuses (grant revoked, peer revoked) has its cache
flushed at once; so does a peer joined anew (its peer.json rewritten). A renewal of the
client certificate keeps the identity and grant, so it keeps the cache and the client:
the client follows the renewed files itself (new calls on a new channel, calls in flight
finish on the old one).

Commands to peers (`command`, `command_stream`) use the same channel and breaker; they are
never cached, and a peer's refusal is relayed as the peer gave it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as redis
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.trace import SpanKind, Status, StatusCode

from tessera.core.errors import (
    FailedPrecondition,
    FieldViolation,
    PermissionDenied,
    Relayed,
    TesseraError,
    Unavailable,
)
from tessera.federation._breaker import BreakerState, CircuitBreaker
from tessera.observability import Metrics, span, trace_metadata, traced
from tessera.peering import OutboundPeer, load_outbound, peers_dir
from tessera_client import AsyncClient
from tessera_client.pb import resources_pb2

log = logging.getLogger(__name__)
State = resources_pb2.SourceStatus
_CACHE_PREFIX = "tessera:fcache:"
_OFFLINE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_DENIED_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                 grpc.StatusCode.RESOURCE_EXHAUSTED)
#: Refusals that mean the grant or the peering is gone: they flush the peer's cache. A
#: rate limit is not one of them (the cached rows are still ours to serve offline).
_REVOKED_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
#: How long the list of joined peers is reused before data_dir/peers is read again.
_PEERS_TTL_S = 1.0
_QUERY_SERVICE = "tessera.v1.QueryService"
_COMMAND_SERVICE = "tessera.v1.CommandService"
#: Seconds a forwarded Execute, GetOperation or CancelOperation may take on the peer (an
#: admission there may wait for its cap's lock); WatchOperation streams without one.
FORWARD_TIMEOUT_S = 15.0
#: A reason relayed from a peer's ErrorInfo (else the code's name is used).
_REASON_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: A peer's answers that say it failed, not the caller: UNAVAILABLE here, never UNKNOWN.
_FAULT_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                grpc.StatusCode.DATA_LOSS, grpc.StatusCode.CANCELLED)
#: The outcome label of tessera_federation_peer_calls_total for each answer state.
_OUTCOMES: dict[int, str] = {State.STATE_OK: "ok", State.STATE_DENIED: "denied",
             State.STATE_OFFLINE: "offline", State.STATE_CACHED: "offline"}


def _cert_stamp(peer: OutboundPeer) -> tuple[int, int]:
    """Changes when the peer is joined anew (not on a renewal of the same identity)."""
    st = (peer.directory / "peer.json").stat()
    return st.st_ino, st.st_mtime_ns


@dataclass
class SourceAnswer:
    """One source's answer to a fanned-out call."""

    source: str
    state: int
    message: str = ""
    response: Any = None

    @property
    def cached(self) -> bool:
        """True when the rows came from the cache."""
        return self.state == State.STATE_CACHED


def load_peers(data_dir: Path) -> dict[str, OutboundPeer]:
    """Every peer recorded by `tessera peers join` under data_dir/peers/."""
    peers: dict[str, OutboundPeer] = {}
    for record in sorted(peers_dir(data_dir).glob("*/peer.json")):
        try:
            peer = load_outbound(data_dir, record.parent.name)
        except (OSError, ValueError, KeyError, TesseraError) as exc:
            log.warning("ignoring unreadable peer record %s: %s", record, type(exc).__name__)
            continue
        peers[peer.name] = peer
    return peers


class Federation:
    """Fans calls out to peers."""

    def __init__(self, data_dir: Path, valkey: redis.Redis, *, timeout_s: float = 2.0,
                 cache_ttl_s: int = 30, breaker_failures: int = 3,
                 breaker_cooldown_s: float = 10.0, metrics: Metrics | None = None) -> None:
        self.data_dir = data_dir
        self.valkey = valkey
        self.timeout_s = timeout_s
        self.cache_ttl_s = cache_ttl_s
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.breakers: dict[str, CircuitBreaker] = {}
        self._clients: dict[str, tuple[tuple[int, int], AsyncClient]] = {}
        self._peers: tuple[float, dict[str, OutboundPeer]] = (-_PEERS_TTL_S, {})
        self._closing: set[asyncio.Task[None]] = set()
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_breakers(self.breaker_states)

    def breaker_states(self) -> dict[str, str]:
        """Each called peer's breaker state now (closed, half_open, open)."""
        now = time.monotonic()
        return {name: b.state(now).value for name, b in self.breakers.items()}

    def peers(self) -> dict[str, OutboundPeer]:
        """The peers this node can call; re-read at most once a second (joins happen live)."""
        now = time.monotonic()
        if now - self._peers[0] >= _PEERS_TTL_S:
            self._peers = (now, load_peers(self.data_dir))
        return self._peers[1]

    async def _client(self, peer: OutboundPeer) -> AsyncClient:
        stamp = _cert_stamp(peer)
        held = self._clients.get(peer.name)
        if held is not None and held[0] == stamp:
            return held[1]
        if held is not None:
            # Joined anew: possibly another grant, so whatever was cached goes too. Calls
            # in flight on the old client get a grace period to finish.
            task = asyncio.create_task(held[1].channel.close(grace=5.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            await self.flush(peer.name)
        client = AsyncClient(peer.address, peer.credentials())
        self._clients[peer.name] = (stamp, client)
        return client

    async def close(self) -> None:
        """Close every channel."""
        for _, client in self._clients.values():
            await client.close()
        self._clients.clear()
        for task in list(self._closing):
            await task

    def _cache_key(self, peer: OutboundPeer, verb: str, kind: str, request: Message) -> str:
        digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        grant = hashlib.sha256(f"{peer.as_identity}|{_cert_stamp(peer)}".encode()).hexdigest()
        return f"{_CACHE_PREFIX}{peer.name}:{grant[:16]}:{verb}:{kind or '*'}:{digest}"

    @traced("valkey flush peer cache", SpanKind.CLIENT)
    async def flush(self, peer: str) -> None:
        """Drop every cached answer of one peer."""
        try:
            async for key in self.valkey.scan_iter(match=f"{_CACHE_PREFIX}{peer}:*", count=500):
                await self.valkey.unlink(key)
        except Exception as exc:  # Valkey down: entries expire by TTL anyway
            log.warning("could not flush the cache of peer %s: %s", peer, type(exc).__name__)

    @traced("valkey GET", SpanKind.CLIENT)
    async def _cache_get(self, key: str, response_type: type[Message]) -> Message | None:
        try:
            raw = await self.valkey.get(key)
            if not isinstance(raw, bytes):  # a miss, or a client set to decode strings
                return None
            return response_type.FromString(raw)
        except Exception as exc:  # Valkey down or a corrupt entry: a miss, not a failure
            log.warning("offline cache read failed: %s", type(exc).__name__)
            return None

    @traced("valkey SET", SpanKind.CLIENT)
    async def _cache_put(self, key: str, response: Message) -> None:
        try:
            await self.valkey.set(key, response.SerializeToString(), ex=self.cache_ttl_s)
        except Exception as exc:
            log.debug("cache write failed: %s", type(exc).__name__)

    async def call(self, names: Sequence[str], method: str, request: Message,
                   response_type: type[Message], *, verb: str, kind: str,
                   cacheable: bool) -> list[SourceAnswer]:
        """Call `QueryService.<method>` on each named peer in parallel."""
        known = self.peers()
        answers = await asyncio.gather(*(
            self._one(known[n], method, request, response_type, verb=verb, kind=kind,
                      cacheable=cacheable) if n in known
            else _unknown(n)
            for n in names
        ))
        return list(answers)

    async def _one(self, peer: OutboundPeer, method: str, request: Message,
                   response_type: type[Message], *, verb: str, kind: str,
                   cacheable: bool) -> SourceAnswer:
        """One peer's answer, in a client span whose context the peer continues."""
        started = time.perf_counter()
        with span(f"{_QUERY_SERVICE}/{method}", SpanKind.CLIENT, **{
                "rpc.system": "grpc", "rpc.service": _QUERY_SERVICE, "rpc.method": method,
                "server.address": peer.address, "tessera.peer": peer.name}) as current:
            answer = await self._ask(peer, method, request, response_type, verb=verb,
                                     kind=kind, cacheable=cacheable)
            if current is not None:
                state = State.State.Name(State.State.ValueType(answer.state))
                current.set_attribute("tessera.source.state", state)
                if answer.state != State.STATE_OK:
                    current.set_status(Status(StatusCode.ERROR, state))
        if self.metrics is not None:
            self.metrics.peer_calls.labels(peer.name, _OUTCOMES.get(answer.state, "error")).inc()
            self.metrics.peer_call_seconds.labels(peer.name).observe(
                time.perf_counter() - started)
        return answer

    async def _ask(self, peer: OutboundPeer, method: str, request: Message,
                   response_type: type[Message], *, verb: str, kind: str,
                   cacheable: bool) -> SourceAnswer:
        breaker = self.breakers.setdefault(
            peer.name, CircuitBreaker(self.breaker_failures, self.breaker_cooldown_s))
        key = self._cache_key(peer, verb, kind, request) if cacheable else ""
        if not breaker.allow(time.monotonic()):
            return await self._offline(peer.name, key, response_type,
                                       "peer offline: circuit open, failing fast")
        try:
            client = await self._client(peer)
            response = await getattr(client.query, method)(
                request, timeout=self.timeout_s, metadata=trace_metadata())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _OFFLINE_CODES:
                breaker.failure(time.monotonic())
                return await self._offline(peer.name, key, response_type,
                                           f"peer offline: {code.name}")
            breaker.success()  # it answered: the transport is fine
            if code in _DENIED_CODES:
                if code in _REVOKED_CODES:
                    await self.flush(peer.name)
                return SourceAnswer(peer.name, State.STATE_DENIED,
                                    f"{code.name}: {exc.details()}")
            if code == grpc.StatusCode.NOT_FOUND:
                return SourceAnswer(peer.name, State.STATE_OK, "not found", None)
            return SourceAnswer(peer.name, State.STATE_DENIED, f"{code.name}: {exc.details()}")
        except OSError as exc:  # unreadable credentials
            return SourceAnswer(peer.name, State.STATE_OFFLINE,
                                f"peer credentials unusable: {type(exc).__name__}")
        breaker.success()
        if cacheable:
            await self._cache_put(key, response)
        return SourceAnswer(peer.name, State.STATE_OK, "", response)

    # -- commands to peers (CommandService over the same channel and breaker) --------

    def _forward_breaker(self, name: str) -> CircuitBreaker:
        breaker = self.breakers.setdefault(
            name, CircuitBreaker(self.breaker_failures, self.breaker_cooldown_s))
        if not breaker.allow(time.monotonic()):
            raise Unavailable(f"peer {name} is offline (its circuit is open after failed "
                              "calls); retry shortly", reason="PEER_UNAVAILABLE")
        return breaker

    def joined(self, name: str) -> OutboundPeer:
        """The joined peer `name`; FailedPrecondition naming the field `target` if none."""
        peer = self.peers().get(name)
        if peer is None:
            raise FailedPrecondition(
                f"no peer named {name!r} has been joined", reason="PEER_NOT_JOINED",
                violations=[FieldViolation("target", f"not a joined peer; joined peers: "
                                           f"{', '.join(sorted(self.peers())) or 'none'}")])
        return peer

    def sendable(self, name: str) -> OutboundPeer:
        """`joined(name)`, and Unavailable while its circuit is open (a call would fail
        fast, sending nothing): checked before anything is stored for a forward. Does
        not take the half-open probe (the call itself does)."""
        peer = self.joined(name)
        breaker = self.breakers.get(name)
        if breaker is not None and breaker.state(time.monotonic()) is BreakerState.OPEN:
            raise Unavailable(f"peer {name} is offline (its circuit is open after failed "
                              "calls); retry shortly", reason="PEER_UNAVAILABLE")
        return peer

    async def command(self, name: str, method: str, request: Message) -> Any:
        """Call `CommandService.<method>` on peer `name` as this node (its grant there).

        The peer's refusals come back as they came (`Relayed`: code, message, details);
        an unreachable peer is Unavailable, never UNKNOWN.
        """
        peer = self.joined(name)
        breaker = self._forward_breaker(name)
        with span(f"{_COMMAND_SERVICE}/{method}", SpanKind.CLIENT, **{
                "rpc.system": "grpc", "rpc.service": _COMMAND_SERVICE, "rpc.method": method,
                "server.address": peer.address, "tessera.peer": name}):
            try:
                client = await self._client(peer)
                response = await getattr(client.command, method)(
                    request, timeout=FORWARD_TIMEOUT_S, metadata=trace_metadata())
            except grpc.aio.AioRpcError as exc:
                raise self._refusal(name, breaker, exc) from None
            except OSError as exc:  # unreadable credentials
                raise Unavailable(f"the credentials for peer {name} are unusable "
                                  f"({type(exc).__name__})", reason="PEER_CREDENTIALS") from None
        breaker.success()
        return response

    async def command_stream(self, name: str, method: str,
                             request: Message) -> AsyncGenerator[Any, None]:
        """Stream `CommandService.<method>` of peer `name` (WatchOperation), as `command`."""
        peer = self.joined(name)
        breaker = self._forward_breaker(name)
        try:
            client = await self._client(peer)
        except OSError as exc:
            raise Unavailable(f"the credentials for peer {name} are unusable "
                              f"({type(exc).__name__})", reason="PEER_CREDENTIALS") from None
        call = getattr(client.command, method)(request, metadata=trace_metadata())
        try:
            first = True
            async for message in call:
                if first:
                    breaker.success()
                    first = False
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self._refusal(name, breaker, exc) from None
        finally:
            call.cancel()  # the local caller left (or the stream ended): end the peer's

    def _refusal(self, name: str, breaker: CircuitBreaker,
                 exc: grpc.aio.AioRpcError) -> TesseraError:
        """The local error for a peer's failed answer."""
        code = exc.code()
        details = (exc.details() or "")[:1000]
        if code in _OFFLINE_CODES:
            breaker.failure(time.monotonic())
            return Unavailable(f"peer {name} is unreachable ({code.name}): {details}; "
                               "retry (the same idempotency key never runs a command twice)",
                               reason="PEER_UNAVAILABLE")
        breaker.success()  # it answered: the transport is fine
        # (A refused command says nothing about the read grant: the query cache stays.)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return PermissionDenied(f"peer {name} did not accept this node's certificate: "
                                    f"{details}", reason="PEER_REFUSED_NODE")
        if code in _FAULT_CODES:
            return Unavailable(f"peer {name} failed the call ({code.name}): {details}",
                               reason="PEER_FAILED")
        raw = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
        reason, status = code.name, b""
        if isinstance(raw, bytes):
            try:
                parsed = status_pb2.Status.FromString(raw)
            except DecodeError:
                parsed = None
            if parsed is not None:
                status = raw
                for detail in parsed.details:
                    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                        info = error_details_pb2.ErrorInfo()
                        detail.Unpack(info)
                        # The peer's word lands in this node's audit log: a stable
                        # name only, nothing else it chose.
                        if _REASON_RE.fullmatch(info.reason):
                            reason = info.reason
        return Relayed(int(code.value[0]), f"peer {name}: {details}", status, reason=reason)

    async def _offline(self, name: str, key: str, response_type: type[Message],
                       why: str) -> SourceAnswer:
        if key:
            cached = await self._cache_get(key, response_type)
            if self.metrics is not None:
                self.metrics.cache_lookups.labels(name, "miss" if cached is None else "hit").inc()
            if cached is not None:
                return SourceAnswer(name, State.STATE_CACHED, f"{why}; served from cache",
                                    cached)
        return SourceAnswer(name, State.STATE_OFFLINE, why)


async def _unknown(name: str) -> SourceAnswer:
    return SourceAnswer(name, State.STATE_OFFLINE, f"no peer named {name!r} has been joined")
