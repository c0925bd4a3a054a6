"""`tessera migrate-tier --to DSN`: an embedded node's data moves to an external
PostgreSQL (standalone, TCP, password), intact, and the node then serves from it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import psycopg
from psycopg import sql

from tessera.core.paths import NodePaths
from tessera.embedded import EmbeddedPostgres
from tessera_client.pb import admin_pb2, command_pb2, resources_pb2
from tests.fixtures.external import ExternalServices, external_database
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.workers import get_note, put_note

#: Tables whose every row must arrive (the others are checked by count as well).
_WANTED = ("resources", "events", "operations", "peers", "grants", "audit_log")


def _counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        names = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND relkind = 'r'"
            " AND relname <> 'schema_migrations'").fetchall()]
        counts = {}
        for n in names:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(n))).fetchone()
            counts[n] = int(row[0]) if row else -1
        return counts


def _audit(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT sequence, hash FROM audit_log"
                            " ORDER BY sequence").fetchall()


async def _migrate_tier(node: NodeProcess, target: str, *extra: str) -> tuple[int, str]:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tessera.cli", "migrate-tier", "--data-dir", str(node.data_dir),
         "--to", target, *extra],
        env=node.env, capture_output=True, timeout=300, check=False)
    return done.returncode, (done.stdout + done.stderr).decode()


async def test_migrate_tier_copies_an_embedded_node_intact_and_idempotently(
    node_factory: NodeFactory, external_services: ExternalServices, peering: Peering,
) -> None:
    node = node_factory(embedded=True)
    async with node.client() as c:
        for i in range(20):
            await c.command.Execute(put_note(f"m{i}"))
        await c.command.Execute(command_pb2.ExecuteRequest(
            idempotency_key="del-m0", delete_resource=command_pb2.DeleteResourceCommand(
                key=resources_pb2.ResourceKey(workspace="w", kind="note", id="m0"))))
    await peering.link(node, "partner", kinds=["note"], workspaces=["w"])
    assert node.stop() == 0

    # Read the embedded database as the node left it.
    pg = EmbeddedPostgres(NodePaths(node.data_dir).pgdata)
    source_dsn = await asyncio.to_thread(pg.start)
    try:
        before = _counts(source_dsn)
        chain = _audit(source_dsn)
    finally:
        await asyncio.to_thread(pg.stop)
    for table in _WANTED:
        assert before[table] > 0, (table, before)

    target = external_database(external_services)
    code, out = await _migrate_tier(node, target, "--dry-run")
    assert code == 0, out
    assert "dry run" in out and "resources: " in out
    assert external_services.password not in out
    with psycopg.connect(target) as conn:  # nothing was created
        assert conn.execute("SELECT to_regclass('public.resources')").fetchone() == (None,)

    code, out = await _migrate_tier(node, target)
    assert code == 0, out
    assert "audit chain verified" in out and external_services.password not in out
    assert "target: green" in out.lower() or "target: GREEN" in out
    assert _counts(target) == before
    assert _audit(target) == chain

    # Again: nothing new, the same result.
    code, out = await _migrate_tier(node, target)
    assert code == 0, out
    assert "resources: " in out and "(0 new)" in out
    assert _counts(target) == before and _audit(target) == chain

    # The node now serves from the external tier: its data is there, new writes chain on.
    node.env["TESSERA_STORE_DSN"] = target
    node.env["TESSERA_VALKEY_URL"] = external_services.valkey_url
    node.start()
    async with node.client() as c:
        got = await c.query.GetResource(get_note("m7"))
        assert got.resource.title == "m7"
        await c.command.Execute(put_note("after-move"))
    async with node.client("admin") as a:
        verdict = await a.admin.VerifyAudit(admin_pb2.VerifyAuditRequest())
    assert verdict.ok, verdict.message
    assert "postgresql" not in json.loads(
        (node.data_dir / "run" / "supervisor.json").read_text())["children"]


async def test_migrate_tier_refuses_a_database_holding_another_nodes_data(
    node_factory: NodeFactory, external_services: ExternalServices,
) -> None:
    target = external_database(external_services)
    other = node_factory(name="other", env={"TESSERA_STORE_DSN": target,
                                            "TESSERA_VALKEY_URL": external_services.valkey_url})
    async with other.client() as c:
        await c.command.Execute(put_note("theirs"))
    other.stop()
    node = node_factory(embedded=True)
    async with node.client() as c:
        await c.command.Execute(put_note("ours"))
    node.stop()
    before = _counts(target)
    code, out = await _migrate_tier(node, target)
    assert code != 0 and "another audit chain" in out, out
    assert _counts(target) == before


async def test_migrate_tier_refuses_while_the_node_runs(
    node_factory: NodeFactory, external_services: ExternalServices,
) -> None:
    node = node_factory(embedded=True)
    code, out = await _migrate_tier(node, external_database(external_services))
    assert code != 0 and "in use" in out, out
