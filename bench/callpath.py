"""The call path's own CPU per call: `python -m bench.callpath [--calls N] [--profile]`.

The node's `CallPath` interceptor wraps a GetResource handler that answers a ready message,
and the wrapped handler is called in a loop with a stand-in for grpc's servicer context (a
client certificate from a throwaway development CA, no metadata). The auditor builds each
call's real audit payload (`tessera.audit.entry_of` and `payload`) and answers at once; the
limiter admits every call; access lines are on, written to memory. No gRPC, no database:
what is left is identity, admission, decoding and checks, the audit record, the access line
and the metrics, which every authorised call pays on top of its servicer.

The figure is microseconds per call on one core (median of the rounds), for comparing
versions of the call path on one machine, not a throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc

from tessera.api import CallPath, Drain
from tessera.audit import entry_of, payload
from tessera.calls import Caller, CallOutcome
from tessera.core.paths import CredentialFiles
from tessera.observability import Metrics, configure_logging
from tessera.pki import DevCA, SpiffeId
from tessera_client.pb import query_pb2

METHOD = "/tessera.v1.QueryService/GetResource"
TRUST_DOMAIN = "bench.test"


class _Context:
    """What the call path asks of grpc's servicer context."""

    def __init__(self, cert_pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [cert_pem], "transport_security_type": [b"ssl"]}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise RuntimeError(f"the benchmark call failed: {status}")


class _Auditor:
    """Builds each call's audit payload, as the writer does, and has it durable at once."""

    def __init__(self) -> None:
        self.sequence = 0

    async def record(self, outcome: CallOutcome) -> int:
        payload(entry_of(outcome))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.sequence += 1
        done.set_result(self.sequence)
        return await done

    def intent(self, outcome: Callable[[], CallOutcome]) -> Any:
        return _NoIntent()


class _NoIntent:
    is_committed = False


class _Admit:
    async def check(self, caller: Caller) -> None:
        return None


def _client_certificate(directory: Path) -> bytes:
    ca = DevCA(directory / "ca", TRUST_DOMAIN)
    files = CredentialFiles(directory / "client.crt", directory / "client.key",
                            directory / "ca.crt")
    ca.issue_files(files, SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/client/bench"),
                   ttl=timedelta(hours=1))
    return files.cert.read_bytes()


async def _measure(calls: int, rounds: int, profile: bool) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="tessera-bench-callpath-") as tmp:
        cert_pem = _client_certificate(Path(tmp))
    configure_logging("text", "INFO", stream=io.StringIO())
    path = CallPath(TRUST_DOMAIN, on_done=Metrics().rpc_done, drain=Drain(),
                    auditor=_Auditor(), limiter=_Admit())
    answer = query_pb2.GetResourceResponse()
    answer.resource.workspace, answer.resource.kind, answer.resource.id = "w", "note", "n1"

    async def get_resource(request: Any, context: Any) -> Any:
        return answer

    handler = grpc.unary_unary_rpc_method_handler(
        get_resource, request_deserializer=query_pb2.GetResourceRequest.FromString,
        response_serializer=query_pb2.GetResourceResponse.SerializeToString)

    async def served(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    wrapped = await path.intercept_service(served, _Details(METHOD))
    call = wrapped.unary_unary
    request = query_pb2.GetResourceRequest()
    request.key.workspace, request.key.kind, request.key.id = "w", "note", "n1"
    raw, context = request.SerializeToString(), _Context(cert_pem)
    for _ in range(min(calls, 2000)):  # warm-up: caches, the handler's first calls
        await call(raw, context)
    results = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            await call(raw, context)
        results.append((time.process_time() - started) / calls * 1e6)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            await call(raw, context)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return results


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def main(argv: list[str] | None = None) -> int:
    """Print the call path's CPU per call."""
    p = argparse.ArgumentParser(prog="python -m bench.callpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000, help="calls per round (20000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--profile", action="store_true",
                   help="then one more round under cProfile, its top functions printed")
    ns = p.parse_args(argv)
    if ns.calls < 1 or ns.rounds < 1:
        p.error("--calls and --rounds must be at least 1")
    rounds = asyncio.run(_measure(ns.calls, ns.rounds, ns.profile))
    print(f"call path of an authorised GetResource, {ns.calls} calls x {ns.rounds} rounds: "
          f"{statistics.median(rounds):.1f} us of CPU per call (median; rounds "
          + ", ".join(f"{r:.1f}" for r in rounds) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
