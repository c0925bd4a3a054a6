"""What per-call admission costs: one indexed query for the peer and its live grant.

Prints numbers, asserts only the plan shape (index use): timing is not a pass/fail matter.
Run: pytest tests/bench/test_admission_cost.py -q -s
"""

from __future__ import annotations

import time

from tessera.config import StoreConfig
from tessera.grants import GrantStore
from tessera.store import migrate, open_pool

PEERS = 2000
GRANTS_PER_PEER = 5  # four revoked, one live


async def test_admission_is_one_indexed_query_per_call(pg_dsn: str) -> None:
    pool = await open_pool(StoreConfig(embedding_dimension=4), pg_dsn)
    try:
        await migrate(pool, StoreConfig(embedding_dimension=4))
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO peers (name, identity, state) SELECT 'p' || i,"
                " 'spiffe://d/node/p' || i, 'ACTIVE' FROM generate_series(1, %s) i", (PEERS,))
            await conn.execute(
                "INSERT INTO grants (id, peer, kinds, workspaces, created_at, revoked_at)"
                " SELECT gen_random_uuid(), 'p' || i, '{task}', '{*}',"
                " now() - make_interval(secs => j), CASE WHEN j > 1 THEN now() END"
                " FROM generate_series(1, %s) i, generate_series(1, %s) j",
                (PEERS, GRANTS_PER_PEER))
            await conn.execute("ANALYZE peers; ANALYZE grants")
        grants = GrantStore(pool)
        calls = 2000
        started = time.perf_counter()
        for n in range(calls):
            found = await grants.admission(f"spiffe://d/node/p{n % PEERS + 1}")
            assert found.grant is not None and found.grant_live
        per_call_ms = (time.perf_counter() - started) / calls * 1000
        async with pool.connection() as conn:
            cur = await conn.execute(
                "EXPLAIN SELECT * FROM peers p LEFT JOIN LATERAL (SELECT * FROM grants WHERE"
                " peer = p.name AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1) g"
                " ON true WHERE p.identity = %s", ("spiffe://d/node/p7",))
            plan = "\n".join(str(r["QUERY PLAN"]) for r in await cur.fetchall())
        print(f"\nadmission: {per_call_ms:.3f} ms per call over {calls} calls "
              f"({PEERS} peers, {PEERS * GRANTS_PER_PEER} grants)\n{plan}")
        assert "Seq Scan" not in plan
    finally:
        await pool.close()
