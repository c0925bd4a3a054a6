"""The registry of benchmark targets, and the ratios between them that have a target value.

A target names the server it needs and knows how to prepare its call inside the client
process (seed data, build the request once). Adding a benchmark is one decorated function
here, plus a server in `bench.servers` if it needs a differently configured one, plus a
`Ratio` if it is compared with another target.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from bench.driver import Call

#: The echo server's one method; bytes in, the same bytes out.
ECHO_METHOD = "/bench.v1.Echo/Echo"

Prepare = Callable[[grpc.aio.Channel], Awaitable[Call]]


@dataclass(frozen=True)
class Target:
    """One thing to measure."""

    name: str
    #: Name of the server (see bench.servers.SERVERS) the calls go to.
    server: str
    description: str
    prepare: Prepare
    #: Measured by a plain `make bench`; others only when named with --targets.
    default: bool = True


@dataclass(frozen=True)
class Ratio:
    """QPS of `numerator` divided by QPS of `denominator`, at the same concurrency."""

    numerator: str
    denominator: str
    #: The target value; None prints the ratio for information only.
    minimum: float | None = None
    #: The target with one call in flight, where it differs (e.g. a call that waits for its
    #: own commit cannot share it with others).
    minimum_single: float | None = None
    #: The target of the server-CPU-per-call ratio (denominator's CPU / numerator's), if any.
    cpu_minimum: float | None = None

    def minimum_at(self, concurrency: int) -> float | None:
        """The target at this concurrency."""
        if concurrency == 1 and self.minimum_single is not None:
            return self.minimum_single
        return self.minimum

    @property
    def label(self) -> str:
        """How the ratio is printed."""
        return f"{self.numerator} / {self.denominator}"


TARGETS: dict[str, Target] = {}

RATIOS: list[Ratio] = [
    # Issue 24: against the bare echo and against echo + the same SELECT through a psycopg
    # pool; the node's server CPU per call at most 1.2x echo+SQL's (CPU ratio >= 1/1.2).
    Ratio("node.get_resource", "echo.sql", minimum=0.85, cpu_minimum=1 / 1.2),
    Ratio("node.get_resource", "echo", minimum=0.35),
    # What audit and rate limiting cost, measured in the same run (issues 4, 6 and 11).
    Ratio("node.get_resource", "node.get_resource.noaudit", minimum=0.95, minimum_single=0.9),
    Ratio("node.get_resource", "node.get_resource.nolimit", minimum=0.9),
    # Printed when these variants are selected with --targets.
    Ratio("node.get_resource.bare", "echo"),
    Ratio("node.health", "echo"),
    Ratio("node.describe", "echo"),
]


def target(
    name: str, *, server: str, description: str, default: bool = True
) -> Callable[[Prepare], Prepare]:
    """Register `prepare` as the target `name`."""

    def register(prepare: Prepare) -> Prepare:
        if name in TARGETS:
            raise ValueError(f"benchmark target {name!r} is registered twice")
        TARGETS[name] = Target(name, server, description, prepare, default)
        return prepare

    return register


# -- the seeded resource -----------------------------------------------------------------

SEED_WORKSPACE, SEED_KIND, SEED_ID = "bench", "task", "r1"


def _get_request_bytes() -> bytes:
    from tessera_client.pb import query_pb2, resources_pb2

    key = resources_pb2.ResourceKey(workspace=SEED_WORKSPACE, kind=SEED_KIND, id=SEED_ID)
    return query_pb2.GetResourceRequest(key=key).SerializeToString()


async def seed_resource(channel: grpc.aio.Channel) -> None:
    """Put bench/task/r1 with an embedding of the node's dimension (idempotent)."""
    from tessera_client.pb import (
        command_pb2,
        command_pb2_grpc,
        query_pb2,
        query_pb2_grpc,
        resources_pb2,
    )

    described = await query_pb2_grpc.QueryServiceStub(channel).Describe(
        query_pb2.DescribeRequest()
    )
    dim = described.embedding_dimension or 384
    embedding = [((i * 37) % 101) / 101.0 for i in range(dim)]
    resource = resources_pb2.Resource(
        workspace=SEED_WORKSPACE, kind=SEED_KIND, id=SEED_ID, title="benchmark resource",
        body="A resource the benchmark reads over and over.", embedding=embedding,
        owner="bench", team="bench",
    )
    resource.attributes.update({"priority": 1, "labels": ["bench"]})
    await command_pb2_grpc.CommandServiceStub(channel).Execute(command_pb2.ExecuteRequest(
        idempotency_key=f"bench-seed-{SEED_ID}-{dim}",
        put_resource=command_pb2.PutResourceCommand(resource=resource),
    ))


# -- targets ------------------------------------------------------------------------------

@target("echo", server="echo",
        description="bare grpc.aio unary echo over mTLS (the request bytes of GetResource)")
async def _echo(channel: grpc.aio.Channel) -> Call:
    payload = _get_request_bytes()
    call = channel.unary_unary(ECHO_METHOD, _registered_method=True)
    if await call(payload) != payload:
        raise RuntimeError("the echo server did not echo")
    return lambda: call(payload)


@target("echo.sql", server="echo-sql",
        description="bare grpc.aio server over mTLS: the node's GetResource SELECT through a "
                    "psycopg pool, then the node's response bytes")
async def _echo_sql(channel: grpc.aio.Channel) -> Call:
    from tessera_client.pb import query_pb2

    payload = _get_request_bytes()
    call = channel.unary_unary(ECHO_METHOD, _registered_method=True)
    reply = query_pb2.GetResourceResponse.FromString(await call(payload))
    if reply.resource.id != SEED_ID:
        raise RuntimeError("the echo+SQL server did not answer the seeded resource")
    return lambda: call(payload)


@target("node.get_resource.noaudit", server="node-noaudit",
        description="GetResource on a node with audit off (no durable row per call)")
@target("node.get_resource.nolimit", server="node-nolimit",
        description="GetResource on a node with rate limiting off (no Valkey decision)")
@target("node.get_resource.bare", server="node-bare", default=False,
        description="GetResource on a node with audit and rate limiting off")
@target("node.get_resource", server="node",
        description="QueryService.GetResource as a local client: authorised, one row from "
                    "PostgreSQL (raw bytes on the client, as for echo)")
async def _get_resource(channel: grpc.aio.Channel) -> Call:
    from tessera_client.pb import query_pb2

    await seed_resource(channel)
    payload = _get_request_bytes()
    call = channel.unary_unary("/tessera.v1.QueryService/GetResource", _registered_method=True)
    reply = query_pb2.GetResourceResponse.FromString(await call(payload))
    if reply.resource.id != SEED_ID:
        raise RuntimeError(f"GetResource returned {reply.resource.id!r}, not {SEED_ID!r}")
    return lambda: call(payload)


@target("node.get_resource.stub", server="node", default=False,
        description="the same GetResource through the generated stub (client decodes the "
                    "protobuf response)")
async def _get_resource_stub(channel: grpc.aio.Channel) -> Call:
    from tessera_client.pb import query_pb2, query_pb2_grpc

    await seed_resource(channel)
    request = query_pb2.GetResourceRequest.FromString(_get_request_bytes())
    stub = query_pb2_grpc.QueryServiceStub(channel)
    return lambda: stub.GetResource(request)


@target("node.health", server="node", default=False,
        description="grpc.health.v1.Health/Check on the node: its gRPC server and call path "
                    "(certificate parsing, metrics), no servicer work, no database")
async def _node_health(channel: grpc.aio.Channel) -> Call:
    payload = b""  # HealthCheckRequest with service "" (the whole server)
    call = channel.unary_unary("/grpc.health.v1.Health/Check", _registered_method=True)
    await call(payload)
    return lambda: call(payload)


@target("node.describe", server="node", default=False,
        description="QueryService.Describe: the call path plus a servicer that builds a reply "
                    "from memory, no database")
async def _node_describe(channel: grpc.aio.Channel) -> Call:
    payload = b""
    call = channel.unary_unary("/tessera.v1.QueryService/Describe", _registered_method=True)
    await call(payload)
    return lambda: call(payload)
