"""The second baseline: `python -m bench.echo_sql_server ...`, a bare grpc.aio server that does
the node's GetResource read and answers fixed bytes.

Like `bench.echo_server` (no proto decoding, no interceptor, the node's certificate and CA,
client certificates required), but each call first runs the node's point `SELECT` for
bench/task/r1 through a psycopg `AsyncConnectionPool` configured as the node's
(`tessera.store._db.open_pool`: dict rows, autocommit, the same session options) against the
node's own PostgreSQL, then answers the bytes the node answers for that resource. Those bytes
are built once at start through the node's own read and conversion code, so the response
size is the node's. The difference between the node and this server is what the node's
trust boundary (identity, admission, rate limit, validation, audit) and its per-call
conversion cost on top of the same read.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

from bench.echo_server import serve_method
from bench.targets import SEED_ID, SEED_KIND, SEED_WORKSPACE

#: The node's GetResource statement for a local caller (no scope) before issue 24, when
#: the node read the embedding through vector_send() in text-format results.
READ_SQL_TEXT = (
    "SELECT workspace, kind, id, title, body, attributes, vector_send(embedding) AS embedding,"
    " owner, team, version, created_at, updated_at"
    " FROM resources WHERE workspace = %s AND kind = %s AND id = %s"
)


def read_statement() -> tuple[Any, bool]:
    """The statement `ResourceStore.get` sends for an unscoped caller, and whether it asks
    for binary results: the node's own SQL where it has one, as the text the node sends
    (a composed statement is rendered again on every execute)."""
    try:
        from tessera.store._resources import _GET_TEXT
    except ImportError:
        pass
    else:
        return _GET_TEXT, True
    try:
        from tessera.store._resources import _GET_SQL
    except ImportError:
        return READ_SQL_TEXT, False
    return _GET_SQL, True


async def open_pool(dsn: str, pool_max: int) -> Any:
    """A pool configured like the node's."""
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    register: Any
    try:  # decode the embedding as the node does (binary, numpy), if the adapter is there
        from pgvector.psycopg import register_vector_async as register
    except ImportError:  # pragma: no cover - older node without the adapter
        register = None

    async def configure(conn: Any) -> None:
        if register is not None:
            await register(conn)

    try:  # the node's session default, where it has one
        from tessera.store._search import DEFAULT_EF_SEARCH as ef_search
    except ImportError:
        ef_search = 100
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=2, max_size=pool_max, open=False, configure=configure,
        kwargs={"row_factory": dict_row, "autocommit": True,
                "options": f"-c statement_timeout=10000 -c hnsw.ef_search={ef_search}"
                           " -c hnsw.iterative_scan=relaxed_order"},
    )
    await pool.open(wait=True, timeout=30)
    return pool


async def response_bytes(pool: Any) -> bytes:
    """The node's GetResourceResponse for the seeded resource, through the node's code."""
    from tessera.api._convert import resource_to_pb
    from tessera.store import ResourceKey, ResourceStore
    from tessera_client.pb import query_pb2

    resource = await ResourceStore(pool).get(ResourceKey(SEED_WORKSPACE, SEED_KIND, SEED_ID))
    return query_pb2.GetResourceResponse(resource=resource_to_pb(resource)).SerializeToString()


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT; write the bound address to --ready-file once up."""
    pool = await open_pool(args.dsn, args.pool_max)
    answer = await response_bytes(pool)
    key = (SEED_WORKSPACE, SEED_KIND, SEED_ID)
    statement, binary = read_statement()
    async with pool.connection() as conn:
        if not isinstance(statement, str):
            statement = statement.as_string(conn)

    async def read(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with pool.connection() as conn:
            cur = await conn.execute(statement, key, binary=binary)
            row = await cur.fetchone()
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "resource vanished")
        return answer

    try:
        await serve_method(args, read)
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the echo+SQL server process."""
    p = argparse.ArgumentParser(prog="python -m bench.echo_sql_server", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--dsn", required=True, help="the node's PostgreSQL")
    p.add_argument("--pool-max", type=int, default=10, help="as the node's store.pool_max")
    p.add_argument("--ready-file", type=Path, required=True)
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
