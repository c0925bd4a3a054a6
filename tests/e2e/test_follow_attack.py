"""Attacks on following peers, by a compromised followed peer, between real nodes.

B is "compromised" by writing rows straight into its own database: its API's checks are
bypassed, and its real Subscribe serves whatever is there to its follower A over mTLS.
Absence is proven by order: a sentinel published after the hostile rows arrives last.
"""

from __future__ import annotations

import psycopg

from tests.e2e.test_follow import (
    FAST,
    _follow,
    _follows,
    _linked,
    _log_of,
    _publish,
    _wait_follow,
)
from tests.fixtures.nodes import NodeFactory, NodeProcess
from tests.fixtures.peers import Peering


def _inject(b: NodeProcess, *, data_json: str, tag: str) -> None:
    """Append an event to B's log directly (as a compromised B would serve it): a task.done
    on B's granted task, copying the team/owner of an event B published properly."""
    with psycopg.connect(b.env["TESSERA_STORE_DSN"], autocommit=True) as conn, \
            conn.transaction():
        conn.execute(
            "WITH c AS (UPDATE event_log SET last_sequence = last_sequence + 1 WHERE id = 1"
            "   RETURNING last_sequence AS s),"
            " t AS (SELECT workspace, kind, resource_id, team, owner, actor, origin"
            "   FROM events WHERE type = 'task.done' ORDER BY sequence DESC LIMIT 1)"
            " INSERT INTO events (sequence, type, workspace, kind, resource_id, team, owner,"
            "   data, actor, origin)"
            " SELECT c.s, 'task.done', t.workspace, t.kind, t.resource_id, t.team, t.owner,"
            "   jsonb_set(%s::jsonb, '{tag}', to_jsonb(%s::text)), t.actor, t.origin"
            " FROM c, t", (data_json, tag))
        conn.execute("SELECT pg_notify('tessera_events', 'x')")


async def test_a_compromised_peer_cannot_store_events_beyond_the_followers_payload_limit(
    node_factory: NodeFactory, peering: Peering,
) -> None:
    """Attack: B serves events far bigger than A's own events.max_payload_bytes (64 KiB by
    default); A stored them all, so a followed peer could fill A's disk (and its read-ahead
    of 2000 envelopes its memory) with payloads A's own API refuses."""
    b = node_factory(name="b", env=FAST)
    a = node_factory(name="a", env=FAST)
    await _linked(b, a, peering)
    await _follow(a, "b", "task.*")
    await _wait_follow(a, "b", "connected")
    before = await _publish(b, 1, "before")
    await _log_of(a, "b", before[-1].id)

    big = '{"blob": "' + "x" * (512 * 1024) + '"}'
    _inject(b, data_json=big, tag="huge")
    _inject(b, data_json='{"small": 1}', tag="fits")
    after = await _publish(b, 1, "after")
    got = await _log_of(a, "b", after[-1].id)
    tags = [e.data["tag"] for e in got]
    assert "huge" not in tags
    # What fits is still stored, in order, and the follow goes on.
    assert tags == ["before", "fits", "after"]
    state = (await _follows(a))["b"]
    assert state.state == "connected" and state.received == 3
