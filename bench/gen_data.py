"""Seeded benchmark data: resources with clustered unit-vector embeddings.

`python -m bench.gen_data --count 100000 --jsonl out.jsonl` writes JSONL that `tessera load`
reads; `--dsn URI` (or `--data-dir D` of a running embedded node) loads the rows straight
into the node's `resources` table with one binary COPY, dropping the HNSW index first and
rebuilding it afterwards (identical definition, `maintenance_work_mem` raised), then runs
VACUUM (ANALYZE), so autovacuum does not visit the table during a measurement. The same
seed always gives the same rows and the same query vectors.

Embeddings: `--clusters` centres drawn from a standard normal and normalised; each vector
is a centre plus N(0, spread²) noise per dimension, normalised to unit length. Query
vectors (`queries`) come from a separate stream of the same seed, near the same centres.
Pure Python (no numpy): about 10 s per 100,000 vectors of 384 dimensions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

#: Index the node's migration creates; recreated after a bulk load with this definition.
INDEX_NAME = "resources_embedding_idx"
INDEX_OPCLASS = {"cosine": "vector_cosine_ops", "l2": "vector_l2_ops",
                 "inner_product": "vector_ip_ops"}
#: Columns the COPY fills; version, created_at, updated_at and fts take their defaults.
COPY_COLUMNS = ("workspace", "kind", "id", "title", "body", "attributes", "embedding",
                "owner", "team")
KINDS = ("task", "note", "memory", "document")
WORKSPACES = ("bench", "bench-a", "bench-b", "bench-c")
_WORDS = ("alpha beta gamma delta vector index search query latency shard replica peer "
          "grant audit token cluster node store embedding recall throughput budget review "
          "deploy incident runbook schema migration backup restore metric alert").split()


class Progress:
    """A one-line progress bar on a terminal (stderr), a line every few seconds otherwise."""

    def __init__(self, label: str, total: int, out: TextIO = sys.stderr,
                 unit: str = "rows") -> None:
        self.label, self.total, self.out, self.unit = label, total, out, unit
        self.started = time.monotonic()
        self.tty = out.isatty()
        self.last = 0.0

    def update(self, done: int, *, final: bool = False, note: str = "") -> None:
        """Show `done` of `total`; rate-limited unless `final`."""
        now = time.monotonic()
        if not final and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        frac = min(1.0, done / self.total) if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = (f"{self.label}: [{'#' * int(frac * 30):<30}] {done:,}/{self.total:,} "
                f"{self.unit}  {rate:,.0f}/s  {elapsed:,.1f}s"
                + (f"  ETA {eta:,.0f}s" if not final else "") + (f"  {note}" if note else ""))
        self.out.write(("\r" + line + " " * 4) if self.tty else line + "\n")
        if final and self.tty:
            self.out.write("\n")
        self.out.flush()


@dataclass(frozen=True)
class Spec:
    """What to generate; everything follows from these."""

    seed: int = 1
    dim: int = 384
    clusters: int = 100
    #: Standard deviation of the per-dimension noise around a centre (before normalising).
    spread: float = 0.03


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(math.fsum(x * x for x in v)) or 1.0
    return [x / n for x in v]


class Generator:
    """Deterministic resources and queries for one `Spec`."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        rng = random.Random(f"centres-{spec.seed}")
        self.centres = [_unit([rng.gauss(0.0, 1.0) for _ in range(spec.dim)])
                        for _ in range(spec.clusters)]

    def _near(self, rng: random.Random) -> tuple[int, list[float]]:
        c = rng.randrange(self.spec.clusters)
        g, s = rng.gauss, self.spec.spread
        return c, _unit([x + g(0.0, s) for x in self.centres[c]])

    def resources(self, count: int) -> Iterator[dict[str, Any]]:
        """`count` resources, each a dict with the JSONL fields of `tessera load`."""
        rng = random.Random(f"resources-{self.spec.seed}")
        for i in range(count):
            cluster, vec = self._near(rng)
            words = rng.sample(_WORDS, 6)
            yield {
                "workspace": WORKSPACES[i % len(WORKSPACES)],
                "kind": KINDS[(i // len(WORKSPACES)) % len(KINDS)],
                "id": f"r{i:07d}",
                "title": f"{words[0]} {words[1]} {i}",
                "body": " ".join(words) + f" (cluster {cluster})",
                "attributes": {"cluster": cluster, "priority": rng.randrange(5),
                               "labels": words[:2]},
                "embedding": vec,
                "owner": f"user{i % 50}",
                "team": f"team{i % 7}",
            }

    def queries(self, count: int) -> list[list[float]]:
        """`count` query vectors near the centres, from a stream of their own."""
        rng = random.Random(f"queries-{self.spec.seed}")
        return [self._near(rng)[1] for _ in range(count)]


# -- JSONL --------------------------------------------------------------------------------

def write_jsonl(gen: Generator, count: int, path: Path, out: TextIO = sys.stderr) -> None:
    """Write `count` resources to `path`, one JSON object per line."""
    bar = Progress(f"generate {path.name}", count, out)
    with path.open("w", encoding="utf-8") as fh:
        for i, r in enumerate(gen.resources(count), 1):
            r["embedding"] = [round(x, 7) for x in r["embedding"]]
            fh.write(json.dumps(r, separators=(",", ":")) + "\n")
            bar.update(i)
    bar.update(count, final=True)


# -- binary COPY --------------------------------------------------------------------------

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _field(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def copy_row(r: dict[str, Any]) -> bytes:
    """One tuple of PostgreSQL's binary COPY format, columns in COPY_COLUMNS order."""
    emb: list[float] = r["embedding"]
    vector = struct.pack(f">HH{len(emb)}f", len(emb), 0, *emb)  # pgvector's binary form
    jsonb = b"\x01" + json.dumps(r["attributes"], separators=(",", ":")).encode()
    parts = [struct.pack(">h", len(COPY_COLUMNS))]
    for name in COPY_COLUMNS:
        if name == "embedding":
            parts.append(_field(vector))
        elif name == "attributes":
            parts.append(_field(jsonb))
        else:
            parts.append(_field(str(r[name]).encode()))
    return b"".join(parts)


def embedded_dsn(data_dir: Path) -> str:
    """DSN of a running embedded node's PostgreSQL (as `tessera doctor` finds it)."""
    lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    port, socket_dir = lines[3].strip(), lines[4].strip()
    return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


def _index_watch(dsn: str, stop: threading.Event, bar: Progress) -> None:
    """Show the HNSW build's progress (pg_stat_progress_create_index) until `stop`."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(0.5):
                row = conn.execute(
                    "SELECT phase, tuples_done FROM pg_stat_progress_create_index"
                    " WHERE relid = 'resources'::regclass").fetchone()
                if row:
                    bar.update(int(row[1] or 0), note=str(row[0]))
    except Exception:  # progress display only
        return


def copy_into(dsn: str, gen: Generator, count: int, *, metric: str = "cosine",
              maintenance_work_mem: str = "1GB", out: TextIO = sys.stderr) -> dict[str, float]:
    """Bulk-load `count` resources into `resources` at `dsn`; seconds per step.

    Drops the HNSW index, COPYs in binary, recreates the index exactly as it was defined
    (its definition read from the database first, so the node's migrations decide it,
    options included), then VACUUM (ANALYZE). Rows already present with the same key fail
    the COPY.

    The VACUUM matters to measurements: without it, autovacuum visits the freshly inserted
    table about 30 s later (its insert threshold) and spends seconds of a core while a
    benchmark runs, on whichever target happens to be measured then.
    """
    import psycopg

    timings: dict[str, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        conn.execute("SET statement_timeout = 0")
        t0 = time.monotonic()
        row = conn.execute("SELECT pg_get_indexdef(to_regclass(%s))", (INDEX_NAME,)).fetchone()
        definition = row[0] if row and row[0] else (
            f"CREATE INDEX {INDEX_NAME} ON resources USING hnsw"
            f" (embedding {INDEX_OPCLASS[metric]})")
        conn.execute(f"DROP INDEX IF EXISTS {INDEX_NAME}")
        bar = Progress("generate + COPY", count, out)
        try:
            with conn.cursor() as cur, cur.copy(
                f"COPY resources ({', '.join(COPY_COLUMNS)}) FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.write(_COPY_HEADER)
                chunk: list[bytes] = []
                for i, r in enumerate(gen.resources(count), 1):
                    chunk.append(copy_row(r))
                    if len(chunk) >= 1000:
                        copy.write(b"".join(chunk))
                        chunk.clear()
                        bar.update(i)
                if chunk:
                    copy.write(b"".join(chunk))
                copy.write(_COPY_TRAILER)
        except BaseException:
            # Put the index back as it was (its options included): a database left
            # without it would get pgvector's defaults from the fallback next time.
            conn.execute(definition.encode())
            raise
        bar.update(count, final=True)
        timings["copy_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        stop = threading.Event()
        ibar = Progress(f"build {INDEX_NAME} (HNSW)", count, out, unit="tuples")
        watcher = threading.Thread(target=_index_watch, args=(dsn, stop, ibar), daemon=True)
        watcher.start()
        try:
            conn.execute(definition.encode())
        finally:
            stop.set()
            watcher.join(2.0)
        timings["index_s"] = time.monotonic() - t0
        ibar.update(count, final=True)
        t0 = time.monotonic()
        conn.execute("VACUUM (ANALYZE) resources")
        timings["vacuum_s"] = time.monotonic() - t0
    print(f"index: {definition}", file=out, flush=True)
    print(f"loaded {count:,} rows: COPY {timings['copy_s']:.1f} s (with generation), "
          f"HNSW index {timings['index_s']:.1f} s, VACUUM (ANALYZE) {timings['vacuum_s']:.1f} s",
          file=out, flush=True)
    return timings


def add_spec_args(p: argparse.ArgumentParser, *, count: int) -> None:
    """The generator's flags, shared with bench.search."""
    p.add_argument("--count", type=int, default=count, help=f"resources (default {count:,})")
    p.add_argument("--dim", type=int, default=384, help="embedding dimension (default 384)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--clusters", type=int, default=Spec.clusters,
                   help=f"gaussian clusters (default {Spec.clusters})")
    p.add_argument("--spread", type=float, default=Spec.spread,
                   help="per-dimension noise around a cluster centre, before normalising "
                        f"(default {Spec.spread})")


def spec_of(args: argparse.Namespace) -> Spec:
    """The Spec the shared flags describe."""
    return Spec(seed=args.seed, dim=args.dim, clusters=args.clusters, spread=args.spread)


def main(argv: list[str] | None = None) -> int:
    """Entry point: write JSONL and/or COPY into a database."""
    p = argparse.ArgumentParser(prog="python -m bench.gen_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p, count=100_000)
    p.add_argument("--jsonl", type=Path, help="write resources to this JSONL file")
    p.add_argument("--dsn", help="COPY into the resources table of this PostgreSQL")
    p.add_argument("--data-dir", type=Path,
                   help="COPY into the embedded PostgreSQL of the running node in this dir")
    p.add_argument("--metric", default="cosine", choices=sorted(INDEX_OPCLASS),
                   help="the node's store.metric, for the recreated index (default cosine)")
    args = p.parse_args(argv)
    if not (args.jsonl or args.dsn or args.data_dir):
        p.error("give --jsonl, --dsn or --data-dir")
    if args.count < 1 or args.dim < 1 or args.clusters < 1 or args.spread < 0:
        p.error("need --count, --dim, --clusters >= 1 and --spread >= 0")
    gen = Generator(spec_of(args))
    if args.jsonl:
        write_jsonl(gen, args.count, args.jsonl)
    dsn = args.dsn or (embedded_dsn(args.data_dir) if args.data_dir else None)
    if dsn:
        copy_into(dsn, gen, args.count, metric=args.metric)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("gen_data: interrupted", file=sys.stderr)
        sys.exit(130)
