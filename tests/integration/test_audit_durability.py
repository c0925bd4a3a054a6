"""An answered call's audit row survives the loss of PostgreSQL's memory, not only of the node.

Killing only the node leaves unsynced WAL with the OS, so that test cannot tell whether
COMMIT waited for the WAL flush. Here PostgreSQL itself (postmaster and every backend) is
killed right after the calls are answered: a commit that returned before its WAL reached
the disk (synchronous_commit off) is lost with the server's shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera import store
from tessera.audit import AuditEntry, payload, query_hash
from tessera.config import StoreConfig
from tessera.embedded import EmbeddedPostgres
from tessera_client.pb import command_pb2, query_pb2, resources_pb2
from tests.fixtures.nodes import NodeFactory

CLIENT = "spiffe://tessera.local/client/local"


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A PostgreSQL server of this test's own, so it can be killed."""
    pg = EmbeddedPostgres(tmp_path / "own-pg")
    dsn = pg.start()
    yield pg, dsn
    with contextlib.suppress(Exception):  # the test killed it; stop what is left
        pg.stop()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The parent pid is the 2nd field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def kill_postgres(pgdata: Path) -> None:
    """SIGKILL the postmaster and all its processes at once (no shutdown, no WAL flush)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    for pid in [*_children(postmaster), postmaster]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _gone(pid: int) -> bool:
    """Exited, or a zombie (the server may be this process's own child, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _wait_gone(pid: int) -> None:
    for _ in range(600):
        if _gone(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return
        time.sleep(0.05)
    pytest.fail(f"process {pid} did not exit")


async def test_audit_rows_survive_killing_postgresql_right_after_the_answers(
    node_factory: NodeFactory, own_pg: tuple[EmbeddedPostgres, str]
) -> None:
    pg, dsn = own_pg
    node = node_factory(env={"TESSERA_STORE_DSN": dsn})
    requests = [query_pb2.GetResourceRequest(key=resources_pb2.ResourceKey(
        workspace="crash", kind="task", id=f"r{i}")) for i in range(50)]
    async with node.client() as c:
        await c.command.Execute(command_pb2.ExecuteRequest(
            idempotency_key="crash-0", put_resource=command_pb2.PutResourceCommand(
                resource=resources_pb2.Resource(workspace="crash", kind="task", id="r0"))))

        async def call(req: query_pb2.GetResourceRequest) -> None:
            try:
                await c.query.GetResource(req)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND

        await asyncio.gather(*(call(r) for r in requests))
    # Every call above was answered, so every row must be durable: kill the database first.
    pgdata = pg.pgdata
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    kill_postgres(pgdata)
    node.kill()
    _wait_gone(postmaster)

    # A fresh process: the wheel caches one server object per data directory per process.
    script = (
        "import json, sys, psycopg\n"
        "from pathlib import Path\n"
        "from tessera.embedded import EmbeddedPostgres\n"
        "pg = EmbeddedPostgres(Path(sys.argv[1]))\n"
        "dsn = pg.start()\n"
        "with psycopg.connect(dsn) as conn:\n"
        "    rows = conn.execute(\"SELECT query_hash FROM audit_log WHERE identity = %s\"\n"
        "                        \" AND method = 'GetResource'\", (sys.argv[2],)).fetchall()\n"
        "pg.stop()\n"
        "print(json.dumps([r[0] for r in rows]))\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, str(pgdata), CLIENT], env=node.env,
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    hashes = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(hashes) == sorted(query_hash(r) for r in requests)


async def synchronous_commit(conn: Any) -> str:
    cur = await conn.execute("SELECT current_setting('synchronous_commit') AS value")
    row = await cur.fetchone()
    return str(row["value"] if isinstance(row, dict) else row[0])


async def test_audit_writes_commit_synchronously_whatever_the_session_says(pg_dsn: str) -> None:
    """Both audit functions force synchronous_commit on for their own transaction, even in
    a session (or a server) configured with it off: the setting in force is checked where it
    matters, inside the transaction, with no crash needed."""
    cfg = StoreConfig(embedding_dimension=4)
    pool = await store.open_pool(cfg, pg_dsn)
    try:
        await store.migrate(pool, cfg)
        entry = AuditEntry(dt.datetime.now(dt.UTC), CLIENT, "", "", "tessera.v1.CommandService",
                           "Execute", "task", "", "ALLOWED", "OK", 10, 5, "", "")
        for call in ("SELECT tessera_audit_append(ARRAY[%s]::bytea[])",
                     "SELECT tessera_audit_pending(%s)"):
            async with pool.connection() as conn:
                await conn.execute("SET synchronous_commit = off")
                try:
                    async with conn.transaction(force_rollback=True):
                        await conn.execute(call, (payload(entry),))
                        assert await synchronous_commit(conn) == "on", call
                    # Local to the transaction: the session's own setting is left alone.
                    assert await synchronous_commit(conn) == "off"
                finally:
                    await conn.execute("RESET synchronous_commit")
    finally:
        await pool.close()
