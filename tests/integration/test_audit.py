"""The audit log against real node processes and PostgreSQL: rows, chain, retention, crashes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest

from tessera import store
from tessera.audit import AuditEntry, AuditRow, payload, query_hash, verify, verify_log
from tessera.config import StoreConfig
from tessera_client import AsyncClient
from tessera_client.pb import admin_pb2, command_pb2, query_pb2
from tests.fixtures.calls import dev_ca_credentials, key, put, run_cli
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering
from tests.fixtures.waiting import wait_until

CLIENT = "spiffe://tessera.local/client/local"
ADMIN = "spiffe://tessera.local/admin/admin"
ALLOWED = admin_pb2.AUDIT_OUTCOME_ALLOWED
DENIED = admin_pb2.AUDIT_OUTCOME_DENIED_BY_POLICY
FAILED = admin_pb2.AUDIT_OUTCOME_FAILED






async def records(node: NodeProcess, **filters: object) -> list[admin_pb2.AuditRecord]:
    """Every audit record matching the filters, through ListAuditRecords pages."""
    out: list[admin_pb2.AuditRecord] = []
    req = admin_pb2.ListAuditRecordsRequest(page_size=1000, **filters)  # type: ignore[arg-type]
    async with node.client("admin") as a:
        while True:
            resp = await a.admin.ListAuditRecords(req)
            out += resp.records
            if not resp.next_page_token:
                return out
            req.page_token = resp.next_page_token


async def verify_audit(node: NodeProcess) -> admin_pb2.VerifyAuditResponse:
    async with node.client("admin") as a:
        return await a.admin.VerifyAudit(admin_pb2.VerifyAuditRequest())


def sql(
    node: NodeProcess, statement: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    """Run one statement on the node's database directly."""
    with psycopg.connect(node.env["TESSERA_STORE_DSN"], autocommit=True) as conn:
        cur = conn.execute(statement.encode(), params)
        return cur.fetchall() if cur.description else []






async def linked(node: NodeProcess) -> None:
    """Wait until every record committed with an effect is in the chain."""
    deadline = asyncio.get_running_loop().time() + 30
    while sql(node, "SELECT count(*) FROM audit_unlinked") != [(0,)]:
        assert asyncio.get_running_loop().time() < deadline, "records never linked"
        await asyncio.sleep(0.05)




async def test_every_call_has_its_row_allowed_denied_and_failed_alike(node: NodeProcess) -> None:
    get = query_pb2.GetResourceRequest(key=key("acme", "task", "t1"))
    async with node.client() as c:
        await c.command.Execute(put("acme", "task", "t1", "k1"))
        await c.query.GetResource(get)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.GetResource(query_pb2.GetResourceRequest(key=key("acme", "task", "no")))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.GetResource(query_pb2.GetResourceRequest(key=key("", "task", "x")))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest())
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    foreign = dev_ca_credentials(node, ["spiffe://elsewhere.example/client/x"],
                                 common_name="stranger", dns_names=())
    async with AsyncClient(node.address, foreign) as stranger:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stranger.query.Describe(query_pb2.DescribeRequest())
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED

    rows = await records(node)
    seen = [(r.identity, r.method, r.outcome, r.status_code, r.kind, r.reason) for r in rows]
    assert seen == [
        (CLIENT, "Execute", ALLOWED, "OK", "task", ""),
        (CLIENT, "GetResource", ALLOWED, "OK", "task", ""),
        (CLIENT, "GetResource", FAILED, "NOT_FOUND", "task", "NOT_FOUND"),
        (CLIENT, "GetResource", FAILED, "INVALID_ARGUMENT", "task", "INVALID_ARGUMENT"),
        (CLIENT, "GetNodeInfo", DENIED, "PERMISSION_DENIED", "", "ADMIN_REQUIRED"),
        ("", "Describe", DENIED, "UNAUTHENTICATED", "", "FOREIGN_TRUST_DOMAIN"),
    ]
    assert [r.sequence for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].service == "tessera.v1.CommandService"
    assert rows[1].service == "tessera.v1.QueryService"
    assert rows[1].query_hash == query_hash(get), "the hash of the request, never the request"
    assert rows[1].bytes_out > 0 and rows[3].bytes_out == 0
    assert all(r.latency_us > 0 and len(r.hash) == 64 for r in rows)
    # The admin's own ListAuditRecords call was audited too, after it was answered.
    again = await records(node, outcome=ALLOWED)
    assert [(r.identity, r.method) for r in again[-1:]] == [(ADMIN, "ListAuditRecords")]
    assert (await verify_audit(node)).ok


async def test_peer_calls_record_peer_and_grant_and_list_filters_by_them(
    node: NodeProcess, peering: Peering,
) -> None:
    reader = await peering.link(node, "reader", kinds=["task"], workspaces=["acme"])
    stranger = await peering.link(node, "stranger")  # enrolled, but no grant
    (grant,) = (await peering_grants(node, "reader"))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await reader.query.GetResource(query_pb2.GetResourceRequest(key=key("acme", "task", "x")))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stranger.query.GetResource(query_pb2.GetResourceRequest(
            key=key("acme", "task", "x")))
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED

    by_peer = await records(node, peer="reader")
    assert [(r.identity, r.grant, r.method, r.outcome, r.kind) for r in by_peer] == [
        ("spiffe://tessera.local/node/reader", grant, "GetResource", FAILED, "task")]
    assert [r.sequence for r in await records(node, grant=grant)] == [by_peer[0].sequence]
    denied = [r for r in await records(node, outcome=DENIED)
              if r.identity == "spiffe://tessera.local/node/stranger"]
    assert [(r.method, r.status_code) for r in denied] == [("GetResource", "PERMISSION_DENIED")]
    res = run_cli(node, "audit", "list", "--peer", "reader")
    assert res.returncode == 0 and res.stdout.count("GetResource") == 1, res.stderr


async def test_rate_limited_calls_have_their_row(node_factory: NodeFactory) -> None:
    # Its own node name: rate-limit state in the shared Valkey is keyed by node identity.
    node = node_factory(name=f"audit-limited-{uuid.uuid4().hex[:8]}",
                        env={"TESSERA_RATELIMIT_LOCAL_LIMITS": "read=0.001/1"})
    async with node.client() as c:
        await c.query.Describe(query_pb2.DescribeRequest())
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.Describe(query_pb2.DescribeRequest())
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    rows = await records(node, outcome=admin_pb2.AUDIT_OUTCOME_RATE_LIMITED)
    assert [(r.method, r.status_code, r.identity) for r in rows] == [
        ("Describe", "RESOURCE_EXHAUSTED", "spiffe://tessera.local/client/local")]


async def peering_grants(node: NodeProcess, peer: str) -> list[str]:
    """Names of the grants of `peer`."""
    async with node.client("admin") as a:
        resp = await a.admin.ListGrants(admin_pb2.ListGrantsRequest(peer=peer))
    return [g.name for g in resp.grants]


async def test_trace_id_of_a_traceparent_is_recorded(node: NodeProcess) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with node.client() as c:
        await c.query.Describe(query_pb2.DescribeRequest(),
                               metadata=(("traceparent", f"00-{trace}-00f067aa0ba902b7-01"),))
    (row,) = await records(node)
    assert row.trace_id == trace and row.method == "Describe"


async def test_odd_text_a_caller_sends_is_recorded_safely_and_verifies(node: NodeProcess) -> None:
    async with node.client() as c:
        for kind in ("tâche\x00", "k" * 5000):
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.query.ListResources(query_pb2.ListResourcesRequest(kind=kind))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rows = await records(node)
    assert [r.kind for r in rows] == ["tâche\ufffd", "k" * 128]
    assert (await verify_audit(node)).ok


async def test_list_filters_by_outcome_and_time_and_pages_with_tokens(node: NodeProcess) -> None:
    async with node.client() as c:
        for _ in range(5):
            await c.query.Describe(query_pb2.DescribeRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                await c.admin.GetNodeInfo(admin_pb2.GetNodeInfoRequest())
    denied = await records(node, outcome=DENIED)
    assert len(denied) == 5 and {r.method for r in denied} == {"GetNodeInfo"}

    middle = denied[2].time
    later = await records(node, outcome=DENIED, start_time=middle)
    assert [r.sequence for r in later] == [r.sequence for r in denied[2:]]
    earlier = await records(node, end_time=middle)
    assert all(r.sequence < denied[2].sequence for r in earlier) and len(earlier) == 5

    async with node.client("admin") as a:
        seen: list[int] = []
        req = admin_pb2.ListAuditRecordsRequest(outcome=ALLOWED, page_size=2)
        while True:
            resp = await a.admin.ListAuditRecords(req)
            assert len(resp.records) <= 2
            seen += [r.sequence for r in resp.records]
            if not resp.next_page_token:
                break
            req.page_token = resp.next_page_token
        allowed_describes = [s for s in seen if s <= 10]
        assert len(allowed_describes) == 5 and seen == sorted(seen)
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # a token of another query
            await a.admin.ListAuditRecords(admin_pb2.ListAuditRecordsRequest(
                outcome=DENIED, page_size=2, page_token=resp.next_page_token or "x.y"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    res = run_cli(node, "audit", "list", "--outcome", "denied")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("GetNodeInfo") == 5 and "ADMIN_REQUIRED" in res.stdout
    res = run_cli(node, "audit", "list", "--since", "1h", "--limit", "3", "--json",
                  "--oldest-first")
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["sequence"] for line in res.stdout.splitlines()] == ["1", "2", "3"]
    res = run_cli(node, "audit", "list", "--until", "2000-01-01T00:00:00")
    assert res.returncode == 0 and res.stdout == "", res.stderr


async def aged(node: NodeProcess, age: dt.timedelta = dt.timedelta(seconds=1)) -> None:
    """Wait until every audit row so far is older than `age` by the wall clock: `audit
    prune --older-than` cuts at its own wall clock minus the age, and it starts later."""
    ((newest,),) = sql(node, "SELECT max(time) FROM audit_log")
    assert isinstance(newest, dt.datetime)
    await wait_until(lambda: dt.datetime.now(dt.UTC) - age > newest,
                     f"the audit rows are older than {age}")


async def _some_calls(node: NodeProcess, n: int) -> None:
    async with node.client() as c:
        for i in range(n):
            await c.command.Execute(put("w", "note", f"n{i}", f"k{i}"))
    await linked(node)


async def test_an_edited_row_makes_verify_fail_naming_it(node: NodeProcess) -> None:
    await _some_calls(node, 5)
    assert (await verify_audit(node)).ok
    assert run_cli(node, "audit", "verify").returncode == 0
    sql(node, "UPDATE audit_log SET identity = 'spiffe://tessera.local/client/other'"
              " WHERE sequence = 3")
    result = await verify_audit(node)
    assert not result.ok and result.first_bad_sequence == 3 and result.checked == 2
    res = run_cli(node, "audit", "verify")
    assert res.returncode == 1 and "record 3" in res.stderr


async def test_a_rows_detail_set_to_another_empty_json_value_is_caught(
    node: NodeProcess,
) -> None:
    # `detail or {}` read [], false, 0 and "" as "no detail": set on any row, they verified
    # unchanged (and a list of pairs hashed like the object it makes). JSON null still
    # reads as no detail: the driver cannot tell it from the NULL of a row from before.
    await _some_calls(node, 5)
    for value in ["[]", "false", '""', "0", '[["a", 1]]']:
        sql(node, "UPDATE audit_log SET detail = %s::jsonb WHERE sequence = 3", (value,))
        result = await verify_audit(node)
        assert not result.ok and result.first_bad_sequence == 3, (value, result)
        sql(node, "UPDATE audit_log SET detail = '{}'::jsonb WHERE sequence = 3")
        assert (await verify_audit(node)).ok
    sql(node, "UPDATE audit_log SET detail = '[1]'::jsonb WHERE sequence = 3")
    # Listing still works; the tampered rows simply show no detail.
    assert len(await records(node)) >= 5


async def test_a_deleted_row_makes_verify_fail_naming_it(node: NodeProcess) -> None:
    await _some_calls(node, 5)
    sql(node, "DELETE FROM audit_log WHERE sequence = 2")
    result = await verify_audit(node)
    assert not result.ok and result.first_bad_sequence == 2 and "missing" in result.message


async def test_deleting_the_newest_rows_is_caught_too(node: NodeProcess) -> None:
    await _some_calls(node, 5)
    sql(node, "DELETE FROM audit_log WHERE sequence >= 4")
    result = await verify_audit(node)
    assert not result.ok and result.first_bad_sequence == 4


async def test_prune_exports_old_rows_and_verification_stays_green(
    node: NodeProcess, tmp_path: Path
) -> None:
    await _some_calls(node, 4)
    await aged(node)  # the rows above become older than the cut-off below
    export = tmp_path / "audit-2026-11.jsonl"
    res = run_cli(node, "audit", "prune", "--older-than", "1s", "--export", str(export))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pruned 4 audit records" in res.stdout
    # A later call chains to the anchor pruning left. (Made after the prune: a loaded
    # machine can take over a second to start the CLI, which would age this row too.)
    async with node.client() as c:
        await c.query.Describe(query_pb2.DescribeRequest())

    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert [r["sequence"] for r in exported] == [1, 2, 3, 4]
    assert {r["method"] for r in exported} == {"Execute"}
    # The export verifies on its own, from the genesis hash.
    rows = [AuditRow(r["sequence"], AuditEntry(
        time=dt.datetime.fromisoformat(r["time"]), identity=r["identity"], peer=r["peer"],
        grant=r["grant"], service=r["service"], method=r["method"], kind=r["kind"],
        query_hash=r["query_hash"], outcome=r["outcome"], status_code=r["status_code"],
        bytes_out=r["bytes_out"], latency_us=r["latency_us"], trace_id=r["trace_id"],
        reason=r["reason"]), bytes.fromhex(r["hash"])) for r in exported]
    assert verify(rows).ok

    assert sql(node, "SELECT min(sequence) FROM audit_log") == [(5,)]
    result = await verify_audit(node)
    assert result.ok and result.checked >= 1
    await _some_calls(node, 2)
    assert (await verify_audit(node)).ok
    sql(node, "UPDATE audit_log SET reason = 'x' WHERE sequence = 5")
    result = await verify_audit(node)
    assert not result.ok and result.first_bad_sequence == 5

    again = run_cli(node, "audit", "prune", "--older-than", "1s", "--export", str(export))
    assert again.returncode != 0 and "exists" in again.stderr, "an export is never overwritten"


async def test_prune_refuses_to_delete_rows_whose_chain_is_broken(
    node: NodeProcess, tmp_path: Path
) -> None:
    await _some_calls(node, 3)
    sql(node, "UPDATE audit_log SET method = 'Forged' WHERE sequence = 2")
    await aged(node)
    export = tmp_path / "x.jsonl"
    res = run_cli(node, "audit", "prune", "--older-than", "1s", "--export", str(export))
    assert res.returncode != 0 and "record 2" in res.stderr
    assert sql(node, "SELECT count(*) FROM audit_log WHERE sequence <= 3") == [(3,)]
    assert not export.exists()


async def test_sigkill_right_after_calls_returned_loses_no_audit_row(node: NodeProcess) -> None:
    requests = [query_pb2.GetResourceRequest(key=key("crash", "task", f"r{i}"))
                for i in range(50)]
    async with node.client() as c:
        await c.command.Execute(put("crash", "task", "r0", "crash-0"))

        async def call(req: query_pb2.GetResourceRequest) -> None:
            try:
                await c.query.GetResource(req)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND

        await asyncio.gather(*(call(r) for r in requests))
    node.crash()
    hashes = sql(node, "SELECT query_hash FROM audit_log WHERE identity = %s"
                       " AND method = 'GetResource'", (CLIENT,))
    assert sorted(h[0] for h in hashes) == sorted(query_hash(r) for r in requests)


async def test_replicas_sharing_a_database_keep_one_linear_chain(
    node_factory: NodeFactory,
) -> None:
    a = node_factory(name="tessera")
    b = node_factory(name="tessera", env={"TESSERA_STORE_DSN": a.env["TESSERA_STORE_DSN"]})

    async def burst(n: NodeProcess, tag: str) -> None:
        async with n.client() as c:
            await asyncio.gather(*(c.command.Execute(put("rep", "task", f"{tag}{i}", f"{tag}{i}"))
                                   for i in range(40)))

    await asyncio.gather(burst(a, "a"), burst(b, "b"))
    # Each write's record committed with it; the writers link them into the chain soon.
    await linked(a)
    assert sql(a, "SELECT count(*), min(sequence), max(sequence) FROM audit_log") == [(80, 1, 80)]
    assert (await verify_audit(a)).ok and (await verify_audit(b)).ok


async def test_a_read_is_refused_when_its_audit_row_cannot_be_written(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        await c.query.Describe(query_pb2.DescribeRequest())
        sql(node, "ALTER TABLE audit_log RENAME TO audit_log_away")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.query.Describe(query_pb2.DescribeRequest())
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit" in (exc.value.details() or "")
        finally:
            sql(node, "ALTER TABLE audit_log_away RENAME TO audit_log")
        await c.query.Describe(query_pb2.DescribeRequest())
    assert (await verify_audit(node)).ok


_REFUSE_AUDIT = """
CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'audit refused by test trigger'; END $$;
CREATE TRIGGER refuse_audit BEFORE INSERT ON {table}
FOR EACH ROW EXECUTE FUNCTION refuse_audit();
"""


async def test_a_write_whose_audit_insert_fails_is_refused_and_absent_afterwards(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        await c.command.Execute(put("w", "task", "before", "b1"))
        # Every audit insert fails: the record written with the effect, and the chained
        # log the call path would fall back to.
        sql(node, _REFUSE_AUDIT.format(table="audit_unlinked"))
        sql(node, "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log"
                  " FOR EACH ROW EXECUTE FUNCTION refuse_audit()")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.command.Execute(put("w", "task", "unaudited", "u1"))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit" in (exc.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.command.Execute(command_pb2.ExecuteRequest(
                    idempotency_key="d1", delete_resource=command_pb2.DeleteResourceCommand(
                        key=key("w", "task", "before"))))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            async with node.client("admin") as a:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await a.admin.InvitePeer(admin_pb2.InvitePeerRequest(name="ghost"))
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            sql(node, "DROP TRIGGER refuse_audit ON audit_log")
            sql(node, "DROP TRIGGER refuse_audit ON audit_unlinked")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.query.GetResource(query_pb2.GetResourceRequest(key=key("w", "task",
                                                                           "unaudited")))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        await c.query.GetResource(query_pb2.GetResourceRequest(key=key("w", "task", "before")))
    assert sql(node, "SELECT count(*) FROM resources WHERE id = 'unaudited'") == [(0,)]
    assert sql(node, "SELECT count(*) FROM operations WHERE idempotency_key IN ('u1', 'd1')"
               ) == [(0,)]
    assert sql(node, "SELECT count(*) FROM events WHERE resource_id = 'unaudited'") == [(0,)]
    assert sql(node, "SELECT count(*) FROM peers WHERE name = 'ghost'") == [(0,)]
    assert (await verify_audit(node)).ok


async def test_a_write_whose_linked_record_fails_falls_back_to_a_failed_row(
    node: NodeProcess,
) -> None:
    """Only the record committed with the effect fails: the write is refused and absent,
    and the refusal itself is recorded in the chained log."""
    async with node.client() as c:
        sql(node, _REFUSE_AUDIT.format(table="audit_unlinked"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.command.Execute(put("w", "task", "half", "h1"))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sql(node, "SELECT count(*) FROM resources WHERE id = 'half'") == [(0,)]
    rows = [r for r in await records(node) if r.method == "Execute"]
    assert [(r.outcome, r.status_code, r.identity) for r in rows] == [
        (FAILED, "UNAVAILABLE", CLIENT)]


async def test_a_write_commits_its_record_with_it_and_the_chain_links_it(
    node: NodeProcess,
) -> None:
    async with node.client() as c:
        await c.command.Execute(put("w", "task", "linked", "l1"))
    # The record committed in the write's transaction; the writer chains it soon after.
    await linked(node)
    rows = [r for r in await records(node) if r.method == "Execute"]
    assert [(r.outcome, r.status_code, r.identity, r.kind) for r in rows] == [
        (ALLOWED, "OK", CLIENT, "task")]
    assert (await verify_audit(node)).ok


async def test_a_record_left_unlinked_makes_verify_fail(pg_dsn: str) -> None:
    """A record committed with its effect that no writer linked (its node died before, and
    none ran since) is flagged; once linked, the chain verifies."""
    cfg = StoreConfig(embedding_dimension=4)
    pool = await store.open_pool(cfg, pg_dsn)
    try:
        await store.migrate(pool, cfg)
        entry = AuditEntry(dt.datetime.now(dt.UTC), CLIENT, "", "", "tessera.v1.CommandService",
                           "Execute", "task", "", "ALLOWED", "OK", 10, 5, "", "")
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO audit_unlinked (payload, written_at)"
                               " VALUES (%s, now() - interval '1 hour')", (payload(entry),))
        verdict = await verify_log(pool)
        assert not verdict.ok and "never linked" in verdict.message
        async with pool.connection() as conn:
            await conn.execute("SELECT tessera_audit_append(ARRAY[]::bytea[])")
        verdict = await verify_log(pool)
        assert verdict.ok and verdict.checked == 1
    finally:
        await pool.close()


async def test_audit_can_be_switched_off_for_benchmarks(node_factory: NodeFactory) -> None:
    node = node_factory(env={"TESSERA_AUDIT_ENABLED": "false"})
    async with node.client() as c:
        await c.query.Describe(query_pb2.DescribeRequest())
    assert sql(node, "SELECT count(*) FROM audit_log") == [(0,)]


async def test_moving_the_prune_anchor_over_a_forged_row_is_detected(
    node: NodeProcess, tmp_path: Path
) -> None:
    """Issue 12.3: forge a row, delete a later one, move audit_anchor: verify must fail."""
    await _some_calls(node, 6)
    assert (await verify_audit(node)).ok
    ((hash4,),) = sql(node, "SELECT hash FROM audit_log WHERE sequence = 4")
    sql(node, "UPDATE audit_log SET identity = 'spiffe://tessera.local/admin/mallory'"
              " WHERE sequence = 3")
    sql(node, "DELETE FROM audit_log WHERE sequence = 4")
    sql(node, "UPDATE audit_anchor SET sequence = 4, hash = %s WHERE id = 1", (hash4,))
    result = await verify_audit(node)
    assert not result.ok and result.first_bad_sequence == 1, result.message
    assert "anchor" in result.message
    # Deleting every row up to the moved anchor does not help: no prune chained it.
    sql(node, "DELETE FROM audit_log WHERE sequence <= 4")
    result = await verify_audit(node)
    assert not result.ok and "named by no prune record" in result.message
    assert run_cli(node, "audit", "verify").returncode == 1


async def test_a_real_prune_chains_its_anchor_and_moving_it_later_is_detected(
    node: NodeProcess, tmp_path: Path
) -> None:
    await _some_calls(node, 4)
    await aged(node)  # the rows above become older than the cut-off below
    await _some_calls(node, 3)
    res = run_cli(node, "audit", "prune", "--older-than", "1s")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (await verify_audit(node)).ok
    (prune_row,) = [r for r in await records(node) if r.method == "Prune"]
    assert prune_row.service == "tessera.audit"
    ((anchor_seq, anchor_hash),) = sql(node, "SELECT sequence, hash FROM audit_anchor")
    assert prune_row.detail["anchor_sequence"] == anchor_seq  # the anchor, in the chain
    assert prune_row.detail["anchor_hash"] == bytes(anchor_hash).hex()
    # Move the anchor forward over a kept row (and delete it, as a prune would have).
    ((seq, h),) = sql(node, "SELECT sequence, hash FROM audit_log WHERE method <> 'Prune'"
                            " ORDER BY sequence LIMIT 1")
    sql(node, "DELETE FROM audit_log WHERE sequence <= %s", (seq,))
    sql(node, "UPDATE audit_anchor SET sequence = %s, hash = %s WHERE id = 1", (seq, h))
    result = await verify_audit(node)
    assert not result.ok and "anchor was moved" in result.message
    # ... and a prune refuses to launder it into a fresh anchor.
    await aged(node)
    again = run_cli(node, "audit", "prune", "--older-than", "1s")
    assert again.returncode != 0 and "anchor" in again.stderr
