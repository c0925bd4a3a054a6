"""SearchResources through the node against the same SQL through psycopg directly.

`make bench-search` (100,000 rows) or `python -m bench.search --help`. Starts a node
(embedded tier, temporary data directory, rate limits raised), bulk-loads seeded resources
with `bench.gen_data`, then measures with the shared closed-loop driver (N in flight, the
same seeded query vectors for both):

- `node.search`: QueryService.SearchResources, k=10, vector only, over mTLS as the local
  client (request bytes built once, response left undecoded, as the other node targets);
- `sql.search`: the node's own SQL for that request (`tessera.store.search_statement`,
  the same parameter encoding, binary results), run as the node runs it (one statement
  when the pool's hnsw.ef_search default suffices, as it does for k <= 37), through a
  psycopg AsyncConnectionPool sized and configured like the node's, against the node's
  database.

Then recall@k of the node's answers (and of the direct SQL's) against exact search
(sequential scan, index scans off) over a sample of the queries. Prints QPS, p50, p99,
the node/direct ratio and recall with PASS/MISS; exits 0 unless something could not run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import datetime as dt
import importlib.util
import itertools
import json
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import asdict
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from bench.driver import Call, Measurement
    from bench.servers import Endpoint

RECALL_MIN = 0.98
RATIO_MIN = 0.8
NODE_TARGET, SQL_TARGET = "node.search", "sql.search"
SEARCH_METHOD = "/tessera.v1.QueryService/SearchResources"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def node_sql(embedding: list[float], k: int) -> tuple[Any, list[Any]]:
    """The node's statement and parameters for a local caller's vector-only search of k.

    Built with the node's own `tessera.store.search_statement`, so it is the SQL (and the
    parameter encoding: pgvector's binary form where the node sends that) the node runs.
    """
    from tessera.store import SearchQuery, search_statement

    query, params = search_statement(SearchQuery(k=k, embedding=embedding), metric="cosine")
    return query, list(params)


def node_ef_search(k: int) -> int:
    """The node's hnsw.ef_search for k, and its connections' default."""
    from tessera.store._search import ef_search_for

    return ef_search_for(k)


def pool_ef_search() -> int:
    """hnsw.ef_search the node's pooled connections start with (tessera.store.open_pool)."""
    from tessera.store._search import DEFAULT_EF_SEARCH

    return DEFAULT_EF_SEARCH


SET_EF = "SELECT set_config('hnsw.ef_search', %s, true)"


async def direct_pool(dsn: str, pool_min: int, pool_max: int) -> Any:
    """An AsyncConnectionPool configured as the node's (tessera.store._db.open_pool)."""
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    async def configure(conn: Any) -> None:
        try:  # the node's embedding adapter, where the node uses it
            from pgvector.psycopg import register_vector_async
        except ImportError:
            return
        await register_vector_async(conn)

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=pool_min, max_size=pool_max, configure=configure,
        kwargs={"row_factory": dict_row, "autocommit": True,
                "options": f"-c statement_timeout=10000 -c hnsw.ef_search={pool_ef_search()}"
                           " -c hnsw.iterative_scan=relaxed_order"},
        open=False, timeout=10.0, name="bench-direct")
    await pool.open(wait=True, timeout=15.0)
    return pool


async def _direct_search(conn: Any, text: str, params: list[Any], ef: int) -> list[Any]:
    """What `tessera.store.search` does on its connection: one statement when the pool's
    ef_search suffices, else set_config and the statement in one transaction."""
    if ef == pool_ef_search():
        cur = await conn.execute(text, params, binary=True)
        return list(await cur.fetchall())
    async with conn.transaction():
        await conn.execute(SET_EF, (str(ef),))
        cur = await conn.execute(text, params, binary=True)
        return list(await cur.fetchall())


async def sql_call(pool: Any, queries: list[list[float]], k: int) -> Call:
    """The direct target: the node's statements, queries taken in turn."""
    async with pool.connection() as conn:
        text = node_sql(queries[0], k)[0].as_string(conn)
    params = [node_sql(q, k)[1] for q in queries]
    ef = node_ef_search(k)
    nxt = itertools.cycle(params).__next__

    async def call() -> object:
        async with pool.connection() as conn:
            return await _direct_search(conn, text, nxt(), ef)

    return call


def search_requests(queries: list[list[float]], k: int) -> list[bytes]:
    """Serialised SearchResourcesRequest per query vector."""
    from tessera_client.pb import query_pb2

    return [query_pb2.SearchResourcesRequest(k=k, embedding=q).SerializeToString()
            for q in queries]


def node_call(channel: grpc.aio.Channel, requests: list[bytes]) -> Call:
    """The node target: raw request bytes in, raw response bytes out."""
    call = channel.unary_unary(SEARCH_METHOD, _registered_method=True)
    nxt = itertools.cycle(requests).__next__
    return lambda: call(nxt())


async def node_answers(channel: grpc.aio.Channel, requests: list[bytes]) -> list[list[str]]:
    """The node's hit keys per request, in order."""
    from tessera_client.pb import query_pb2

    call = channel.unary_unary(SEARCH_METHOD, _registered_method=True)
    found = []
    for req in requests:
        reply = query_pb2.SearchResourcesResponse.FromString(await call(req))
        found.append([f"{h.resource.workspace}/{h.resource.kind}/{h.resource.id}"
                      for h in reply.hits])
    return found


async def sql_answers(pool: Any, queries: list[list[float]], k: int, *,
                      exact: bool, ef_search: int | None = None) -> list[list[str]]:
    """Hit keys per query: the node's SQL (exact=False) or an exact sequential scan.

    `ef_search` replaces the node's hnsw.ef_search (for the --ef-probe figures only).
    """
    from bench.gen_data import Progress
    from tessera.store._resources import vector_literal

    label = "exact search (sequential scan)" if exact else "direct SQL answers" + (
        f" at ef_search {ef_search}" if ef_search else "")
    bar = Progress(label, len(queries), unit="queries")
    found = []
    async with pool.connection() as conn:
        text = node_sql(queries[0], k)[0].as_string(conn)
        ef = ef_search or node_ef_search(k)
        for i, q in enumerate(queries, 1):
            if exact:
                async with conn.transaction():
                    await conn.execute("SET LOCAL enable_indexscan = off")
                    await conn.execute("SET LOCAL enable_bitmapscan = off")
                    cur = await conn.execute(
                        "SELECT workspace, kind, id FROM resources WHERE embedding IS NOT NULL"
                        " ORDER BY embedding <=> %s::vector, workspace, kind, id LIMIT %s",
                        (vector_literal(q), k))
                    rows = await cur.fetchall()
            else:
                rows = await _direct_search(conn, text, node_sql(q, k)[1], ef)
            found.append([f"{r['workspace']}/{r['kind']}/{r['id']}" for r in rows])
            bar.update(i)
    bar.update(len(queries), final=True)
    return found


def recall(found: list[list[str]], exact: list[list[str]], k: int) -> float:
    """Mean fraction of the exact top k found."""
    return statistics.fmean(len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact,
                                                                               strict=True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    from bench.gen_data import add_spec_args

    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p, count=100_000)
    p.add_argument("--k", type=int, default=10, help="hits per search (default 10)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="calls in flight, for both targets (default 32)")
    p.add_argument("--sequential", action="store_true",
                   help="also measure with 1 call in flight")
    p.add_argument("--duration", type=float, default=10.0,
                   help="measured seconds per target (default 10)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="warm-up seconds before each measurement (default 2)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, targets interleaved; the ratio is the median (default 1)")
    p.add_argument("--queries", type=int, default=1000,
                   help="distinct query vectors, used in turn (default 1000)")
    p.add_argument("--recall-sample", type=int, default=200,
                   help="queries checked against exact search (default 200)")
    p.add_argument("--ef-probe", default="",
                   help="comma-separated hnsw.ef_search values at which to also report the "
                        "direct SQL's recall (information; the node's own value is "
                        "tessera.store's ef_search_for(k))")
    p.add_argument("--pool-max", type=int, default=10,
                   help="the node's store.pool_max and the direct pool's size (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 2,000 rows, 1 s per target after 0.5 s warm-up, "
                        "recall over 50 queries")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.duration, args.warmup = 2000, 1.0, 0.5
        args.recall_sample, args.queries = 50, 200
    args.recall_sample = min(args.recall_sample, args.queries)
    try:
        args.ef_probe = [int(x) for x in args.ef_probe.split(",") if x.strip()]
    except ValueError:
        p.error("--ef-probe takes comma-separated integers")
    if min(args.count, args.k, args.concurrency, args.queries, args.repeat,
           args.pool_max, args.recall_sample) < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("counts must be >= 1, --duration > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the search benchmark; 0 unless something could not run."""
    missing = [m for m in ("grpc", "psycopg", "psycopg_pool", "tessera", "tessera_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench.search: {', '.join(missing)} not importable by {sys.executable}; "
              "run with the project's environment (make bench-search PYTHON=...)",
              file=sys.stderr)
        return 2
    args = parse_args(argv)
    from bench.servers import BenchError, Stack

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="tessera-bench-search-"))
    stack = Stack(root)
    code = 0
    try:
        code = asyncio.run(run(args, stack))
    except BenchError as exc:
        print(f"bench.search: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench.search: interrupted", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("bench.search: stopping the node", file=sys.stderr, flush=True)
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    return code


def _fmt(v: float) -> str:
    return f"{v:8.2f}" if v == v else "       -"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def run(args: argparse.Namespace, stack: Any) -> int:
    """Everything between starting the node and stopping it."""
    from bench.client import secure_channel
    from bench.driver import measure
    from bench.gen_data import Generator, copy_into, embedded_dsn, spec_of
    from bench.run import _loadavg, machine_facts
    from bench.servers import NODE_ENV, start_node

    facts = machine_facts()
    started = time.monotonic()
    print(f"bench.search: starting a node under {stack.root}", file=sys.stderr, flush=True)
    limits = NODE_ENV["TESSERA_RATELIMIT_LOCAL_LIMITS"] + ", search=1000000/1000000"
    node: Endpoint = start_node(stack, "node", {
        "TESSERA_RATELIMIT_LOCAL_LIMITS": limits,
        "TESSERA_STORE_EMBEDDING_DIMENSION": str(args.dim),
        "TESSERA_STORE_POOL_MAX": str(args.pool_max),
    })
    dsn = embedded_dsn(node.extras["data_dir"])
    gen = Generator(spec_of(args))
    load = copy_into(dsn, gen, args.count)
    queries = gen.queries(args.queries)
    requests = search_requests(queries, args.k)
    pool = await direct_pool(dsn, 2, args.pool_max)
    results: list[Measurement] = []
    try:
        async with secure_channel(node.address, node.ca, node.cert, node.key,
                                  node.server_name) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
            first = await node_answers(channel, requests[:1])
            if len(first[0]) != min(args.k, args.count):
                raise RuntimeError(f"SearchResources returned {len(first[0])} hits, "
                                   f"expected {args.k}")
            targets = {NODE_TARGET: lambda: node_call(channel, requests)}
            levels = [args.concurrency, 1] if args.sequential and args.concurrency > 1 \
                else [args.concurrency]
            for level in levels:
                for rnd in range(args.repeat):
                    for name in (NODE_TARGET, SQL_TARGET):
                        print(f"bench.search: {name}, {level} in flight, {args.warmup:g} s + "
                              f"{args.duration:g} s" + (f", round {rnd + 1}/{args.repeat}"
                                                       if args.repeat > 1 else ""),
                              file=sys.stderr, flush=True)
                        call = targets[name]() if name == NODE_TARGET \
                            else await sql_call(pool, queries, args.k)
                        results.append(await measure(
                            name, call, concurrency=level, duration_s=args.duration,
                            warmup_s=args.warmup, cpu_groups=node.cpu_groups))
            sample = args.recall_sample
            print(f"bench.search: recall@{args.k} over {sample} queries", file=sys.stderr,
                  flush=True)
            node_found = await node_answers(channel, requests[:sample])
        sql_found = await sql_answers(pool, queries[:sample], args.k, exact=False)
        exact = await sql_answers(pool, queries[:sample], args.k, exact=True)
        probes = {ef: recall(await sql_answers(pool, queries[:sample], args.k, exact=False,
                                               ef_search=ef), exact, args.k)
                  for ef in args.ef_probe}
    finally:
        await pool.close()
    node_recall = recall(node_found, exact, args.k)
    sql_recall = recall(sql_found, exact, args.k)
    same = sum(a == b for a, b in zip(node_found, sql_found, strict=True))

    out: list[str] = []
    out.append(f"Tessera search benchmark, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    out.append(f"machine: {facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory']}, "
               f"{facts['kernel']}; Python {facts['python']}; grpcio {facts['grpcio']}")
    out.append(f"load average (1 min): {facts['loadavg_start']} at start, {_loadavg()} at end")
    out.append(f"data: {args.count:,} resources, {args.dim}-dim unit vectors in "
               f"{args.clusters} clusters (spread {args.spread:g}, seed {args.seed}); "
               f"COPY {load['copy_s']:.1f} s, HNSW build {load['index_s']:.1f} s")
    out.append(f"search: k={args.k}, vector only, {args.queries:,} query vectors in turn; "
               f"node pool_max = direct pool size = {args.pool_max}")
    ef = node_ef_search(args.k)
    out.append(f"hnsw.ef_search {ef}, " + (
        "the pools' default: one statement per search for both" if ef == pool_ef_search()
        else f"set per search (the pools' default is {pool_ef_search()}): "
             "set_config and the statement in one transaction for both"))
    out.append(f"run: {args.duration:g} s per target after {args.warmup:g} s warm-up, "
               f"in flight {', '.join(map(str, levels))}, {args.repeat} round(s); "
               "one client process, the same driver for both targets")
    out.append("")
    rounds = args.repeat > 1
    out.append(f"  {'target':<14}{'in flight':>10}{'round' if rounds else '':>6}{'calls':>9}"
               f"{'QPS':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
               f"{'node us':>9}{'pg us':>8}{'client us':>10}")
    seen: dict[tuple[str, int], int] = {}
    for m in results:
        seen[(m.target, m.concurrency)] = seen.get((m.target, m.concurrency), 0) + 1
        label = str(seen[(m.target, m.concurrency)]) if rounds else ""
        c = m.cpu_us_per_call
        cpu = "".join(f"{c[key]:{w}.0f}" if key in c else f"{'-':>{w}}"
                      for key, w in (("server", 9), ("postgresql", 8), ("client", 10)))
        out.append(f"  {m.target:<14}{m.concurrency:>10}{label:>6}{m.calls:>9}{m.qps:>10.1f}"
                   f"{_fmt(m.p50_ms):>9}{_fmt(m.p99_ms):>9}{m.errors:>8}{cpu}")
        if m.errors:
            out.append(f"      first error: {m.first_error}")
    out.append("  (CPU per call: node = tessera serve process, pg = PostgreSQL and all its "
               "backends, client = this process)")
    out.append("")
    ratios: dict[int, float] = {}
    for level in levels:
        a = [m for m in results if m.target == NODE_TARGET and m.concurrency == level]
        b = [m for m in results if m.target == SQL_TARGET and m.concurrency == level]
        values = [x.qps / y.qps for x, y in zip(a, b, strict=True) if y.qps > 0]
        if values:
            ratios[level] = statistics.median(values)
            over = f", median of {len(values)} rounds" if len(values) > 1 else ""
            spread = f" (rounds {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
            out.append(f"  ratio {NODE_TARGET} / {SQL_TARGET} (QPS, {level} in flight{over}): "
                       f"{ratios[level]:5.2f}{spread}   target >= {RATIO_MIN:.2f}   "
                       f"{_verdict(ratios[level] >= RATIO_MIN)}")
    out.append(f"  recall@{args.k} of the node's answers vs exact search ({len(exact)} "
               f"queries): {node_recall:.3f}   target >= {RECALL_MIN:.2f}   "
               f"{_verdict(node_recall >= RECALL_MIN)}")
    out.append(f"  recall@{args.k} of the direct SQL's answers: {sql_recall:.3f} "
               f"(same hits as the node for {same}/{len(exact)} queries)")
    for ef, value in probes.items():
        out.append(f"  recall@{args.k} of the direct SQL at hnsw.ef_search {ef}: {value:.3f} "
                   "(information)")
    out.append(f"total time {time.monotonic() - started:.0f} s")
    print("\n".join(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": facts, "settings": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()},
            "load": load, "measurements": [asdict(m) for m in results],
            "ratios": {str(k): v for k, v in ratios.items()},
            "recall": {"node": node_recall, "sql": sql_recall, "queries": len(exact),
                       "ef_probe": {str(k): v for k, v in probes.items()}},
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
