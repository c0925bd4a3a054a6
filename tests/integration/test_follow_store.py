"""The follow store against real PostgreSQL: received events are stored once, tagged, served
to peers never (the SQL relation a peer's read uses holds none), and forgotten on request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tessera import store
from tessera.config import StoreConfig
from tessera.core.errors import FailedPrecondition
from tessera.store import EventStore, FollowStopped, FollowStore, NewEvent, ReceivedEvent

ALL = ["%"]


def received(n: int) -> list[ReceivedEvent]:
    return [ReceivedEvent(origin_id=uuid.uuid4(), type="task.done", workspace="acme",
                          kind="task", resource_id=f"t{i}", data={"i": i},
                          actor="spiffe://b.test/user/bob", origin_time=datetime.now(UTC))
            for i in range(n)]


@pytest.fixture
async def pool(pg_dsn: str) -> Any:
    cfg = StoreConfig(embedding_dimension=4)
    p = await store.open_pool(cfg, pg_dsn)
    await store.migrate(p, cfg)
    yield p
    await p.close()


async def test_received_events_are_stored_once_and_never_read_for_a_peer(
    pool: Any, pg_dsn: str,
) -> None:
    events = EventStore(pool, origin="a")
    follows = FollowStore(pool)
    await follows.follow("b", ["task.*"])
    mine = await events.publish([NewEvent("task.done", "acme", "task", "t0")], actor="me")
    batch = received(3)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True,
                                                     row_factory=dict_row) as conn:
        assert await store.store_received(conn, peer="b", origin="spiffe://b.test/node/b",
                                          events=batch, cursor="c1") == (3, 0)
        # Delivered again (an ack lost): dropped by (peer, origin id), cursor still moves.
        assert await store.store_received(conn, peer="b", origin="spiffe://b.test/node/b",
                                          events=[*batch[1:], *received(1)],
                                          cursor="c2") == (1, 2)
    everything = await events.read(after=0, limit=100, like_patterns=ALL)
    assert len(everything.events) == 5
    assert [e.peer for e in everything.events] == ["", "b", "b", "b", "b"]
    assert [e.origin_id for e in everything.events[1:4]] == [e.origin_id for e in batch]
    assert everything.events[1].origin == "spiffe://b.test/node/b"

    # Every way of reading for a peer sees this node's own event only.
    for kwargs in ({"for_peer": True}, {"grant_like_patterns": ALL},
                   {"for_peer": True, "origins": ["", "b"]}):
        page = await events.read(after=0, limit=100, like_patterns=ALL, **kwargs)
        assert [e.id for e in page.events] == [mine[0].id], kwargs
    asked = await events.read(after=0, limit=100, like_patterns=ALL, for_peer=True,
                              origins=["b"])
    assert asked.events == []
    only_b = await events.read(after=0, limit=100, like_patterns=ALL, origins=["b"])
    assert len(only_b.events) == 4
    local = await events.read(after=0, limit=100, like_patterns=ALL, origins=[""])
    assert [e.id for e in local.events] == [mine[0].id]

    state = await follows.get("b")
    assert state is not None
    assert (state.cursor, state.received, state.duplicates) == ("c2", 4, 2)

    # The relation itself holds no received event, whatever a statement filters on.
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM events_shareable WHERE peer <> ''")
        row = await cur.fetchone()
    assert row is not None and row["n"] == 0


async def test_forget_needs_unfollow_and_stops_a_follower_storing_more(
    pool: Any, pg_dsn: str,
) -> None:
    events = EventStore(pool, origin="a")
    follows = FollowStore(pool)
    await follows.follow("b", [])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True,
                                                     row_factory=dict_row) as conn:
        await store.store_received(conn, peer="b", origin="b", events=received(2), cursor="c")
        with pytest.raises(FailedPrecondition) as refused:
            await follows.forget("b")
        assert "unfollow" in str(refused.value)
        await follows.unfollow("b")
        # A follower that has not noticed the unfollow yet writes nothing.
        with pytest.raises(FollowStopped):
            await store.store_received(conn, peer="b", origin="b", events=received(1),
                                       cursor="d")
    assert await follows.forget("b") == 2
    assert (await events.read(after=0, limit=100, like_patterns=ALL)).events == []
    assert await follows.get("b") is None
