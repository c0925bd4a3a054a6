"""Peers, grants and enrolment tokens in PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from tessera.core.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from tessera.grants._model import Grant, Peer, PeerState
from tessera.store import Pool, effect_transaction

#: NOTIFY channel announcing that a peer's grant or state changed; the payload is the
#: peer's name. Open event streams of that peer re-check their admission at once.
GRANTS_CHANNEL = "tessera_grants"

_GRANT_COLUMNS = (
    "id, peer, kinds, excluded_kinds, workspaces, teams, subject_user, include_personal,"
    " row_cap, command_types, event_types, rate_per_s, burst, expire_time, created_at,"
    " revoked_at, row_budget, row_budget_window_s"
)


def grant_id(name: str) -> uuid.UUID:
    """The uuid of "grants/<uuid>"; NotFound for anything else."""
    try:
        return uuid.UUID(name.removeprefix("grants/"))
    except ValueError:
        raise NotFound(f"grant {name} does not exist") from None


def _row_to_peer(row: dict[str, Any]) -> Peer:
    return Peer(
        name=row["name"], identity=row["identity"], address=row["address"],
        state=PeerState(row["state"]), certificate_serial=row["certificate_serial"],
        state_reason=row["state_reason"], created_at=row["created_at"],
        updated_at=row["updated_at"], certificate_not_after=row.get("certificate_not_after"),
        previous_certificate_serial=row.get("previous_certificate_serial") or "",
    )


def _row_to_grant(row: dict[str, Any], prefix: str = "") -> Grant:
    g = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
    return Grant(
        name=f"grants/{g['id']}", peer=g["peer"], kinds=frozenset(g["kinds"]),
        excluded_kinds=frozenset(g["excluded_kinds"]), workspaces=frozenset(g["workspaces"]),
        teams=frozenset(g["teams"]), subject_user=g["subject_user"],
        include_personal=g["include_personal"], row_cap=g["row_cap"],
        command_types=frozenset(g["command_types"]), event_types=frozenset(g["event_types"]),
        rate_per_s=g["rate_per_s"], burst=g["burst"], expire_time=g["expire_time"],
        created_at=g["created_at"], revoked_at=g["revoked_at"],
        row_budget=int(g.get("row_budget") or 0),
        row_budget_window_s=int(g.get("row_budget_window_s") or 0),
    )


@dataclass(frozen=True)
class Admitted:
    """What admission learns about a calling identity in one query."""

    peer: Peer | None
    #: The newest unrevoked grant of the peer, expired or not.
    grant: Grant | None
    #: Whether that grant is still within its expiry (by the database clock).
    grant_live: bool


class GrantStore:
    """Reads and writes peers, grants and enrolment tokens."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    # -- admission ------------------------------------------------------------------

    async def admission(self, identity: str) -> Admitted:
        """The peer with this identity and its current grant: one indexed query.

        Nothing is cached: a revocation committed before this query is seen by it, on
        every replica, which is what makes revocation effective on the next call.
        """
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT p.*, g.id AS g_id, g.peer AS g_peer, g.kinds AS g_kinds,"
                " g.excluded_kinds AS g_excluded_kinds, g.workspaces AS g_workspaces,"
                " g.teams AS g_teams, g.subject_user AS g_subject_user,"
                " g.include_personal AS g_include_personal, g.row_cap AS g_row_cap,"
                " g.command_types AS g_command_types, g.event_types AS g_event_types,"
                " g.rate_per_s AS g_rate_per_s, g.burst AS g_burst,"
                " g.expire_time AS g_expire_time, g.created_at AS g_created_at,"
                " g.revoked_at AS g_revoked_at, g.row_budget AS g_row_budget,"
                " g.row_budget_window_s AS g_row_budget_window_s,"
                " (g.expire_time IS NULL OR g.expire_time > now()) AS g_live"
                " FROM peers p LEFT JOIN LATERAL ("
                "   SELECT * FROM grants WHERE peer = p.name AND revoked_at IS NULL"
                "   ORDER BY created_at DESC LIMIT 1) g ON true"
                " WHERE p.identity = %s",
                (identity,),
            )
            row = await cur.fetchone()
        if row is None:
            return Admitted(None, None, False)
        grant = _row_to_grant(row, "g_") if row["g_id"] is not None else None
        return Admitted(_row_to_peer(row), grant, bool(row["g_live"]))

    # -- peers ----------------------------------------------------------------------

    async def create_invitation(
        self, *, name: str, identity: str, token_id: uuid.UUID, secret_hash: bytes,
        expire_time: datetime,
    ) -> Peer:
        """Create an INVITED peer and its token in one transaction (with its audit record)."""
        try:
            async with effect_transaction(self.pool) as conn:
                cur = await conn.execute(
                    "INSERT INTO peers (name, identity, state) VALUES (%s, %s, 'INVITED')"
                    " RETURNING *",
                    (name, identity),
                )
                row = await cur.fetchone()
                await conn.execute(
                    "INSERT INTO enrolment_tokens (id, secret_hash, peer, expire_time)"
                    " VALUES (%s, %s, %s, %s)",
                    (token_id, secret_hash, name, expire_time),
                )
        except psycopg.errors.UniqueViolation:
            raise FailedPrecondition(
                f"a peer named {name!r} already exists; names are never reused",
                reason="PEER_EXISTS",
            ) from None
        assert row is not None
        return _row_to_peer(row)

    async def token(self, token_id: uuid.UUID) -> tuple[bytes, str, bool, bool]:
        """(secret hash, peer, expired, used) of a token; Unauthenticated if unknown."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT secret_hash, peer, expire_time <= now() AS expired,"
                " used_at IS NOT NULL AS used FROM enrolment_tokens WHERE id = %s",
                (token_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise Unauthenticated("the enrolment token is not valid", reason="TOKEN_INVALID")
        return bytes(row["secret_hash"]), row["peer"], row["expired"], row["used"]

    async def renew_certificate(self, name: str, *, presented_hex: str, serial_hex: str,
                                not_after: datetime) -> tuple[Peer, str] | None:
        """Record a renewed peer certificate if the peer is ACTIVE and presented its current
        (or, after a lost answer, its previous) serial; None when that no longer holds.
        The previous serial renews once at most: after that only the current one does.

        Also returns the serial that was current before (the one an answer was lost for,
        when it is not the presented one)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE peers SET previous_certificate_serial = CASE"
                "   WHEN certificate_serial = %(p)s THEN certificate_serial"
                "   ELSE '' END,"
                " certificate_serial = %(n)s, certificate_not_after = %(t)s, updated_at = now()"
                " WHERE name = %(name)s AND state = 'ACTIVE'"
                " AND %(p)s <> '' AND %(p)s IN (certificate_serial, previous_certificate_serial)"
                " RETURNING *, (SELECT certificate_serial FROM peers WHERE name = %(name)s)"
                " AS replaced_serial",
                {"p": presented_hex, "n": serial_hex, "t": not_after, "name": name},
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return _row_to_peer(row), str(row["replaced_serial"] or "")

    async def redeem(self, token_id: uuid.UUID, *, serial_hex: str, address: str,
                     not_after: datetime | None = None) -> Peer:
        """Use a token once and activate its peer, atomically.

        The conditional UPDATE is the single-use guarantee: of two concurrent redemptions
        only one matches `used_at IS NULL`.
        """
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE enrolment_tokens SET used_at = now()"
                " WHERE id = %s AND used_at IS NULL AND expire_time > now() RETURNING peer",
                (token_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise PermissionDenied("the enrolment token was already used or has expired",
                                       reason="TOKEN_USED")
            cur = await conn.execute(
                "UPDATE peers SET state = 'ACTIVE', certificate_serial = %s, address = %s,"
                " certificate_not_after = %s, updated_at = now()"
                " WHERE name = %s AND state = 'INVITED' RETURNING *",
                (serial_hex, address, not_after, row["peer"]),
            )
            peer = await cur.fetchone()
            if peer is None:
                raise PermissionDenied("the invited peer is no longer waiting to enrol",
                                       reason="PEER_NOT_INVITED")
        return _row_to_peer(peer)

    async def get_peer(self, name: str) -> Peer:
        """One peer; NotFound if absent."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM peers WHERE name = %s", (name,))
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"peer {name} does not exist")
        return _row_to_peer(row)

    async def list_peers(
        self, *, state: PeerState | None, limit: int, after: str | None
    ) -> list[Peer]:
        """Peers by name."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM peers WHERE (%s::text IS NULL OR state = %s::text)"
                " AND (%s::text IS NULL OR name > %s::text) ORDER BY name LIMIT %s",
                (state, state, after, after, limit),
            )
            rows = await cur.fetchall()
        return [_row_to_peer(r) for r in rows]

    async def set_peer_state(
        self, name: str, state: PeerState, reason: str, *, allowed_from: Sequence[PeerState]
    ) -> Peer:
        """Move a peer to `state` if it is in one of `allowed_from`."""
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE peers SET state = %s, state_reason = %s, updated_at = now()"
                " WHERE name = %s AND state = ANY(%s::text[]) RETURNING *",
                (state.value, reason, name, [s.value for s in allowed_from]),
            )
            row = await cur.fetchone()
            if row is None:
                # Raised inside the transaction: no change, so no success is recorded.
                peer = await self.get_peer(name)
                raise FailedPrecondition(
                    f"peer {name} is {peer.state.value} and cannot become {state.value}",
                    reason="PEER_STATE",
                )
            await conn.execute("SELECT pg_notify(%s, %s)", (GRANTS_CHANNEL, name))
        return _row_to_peer(row)

    # -- grants ---------------------------------------------------------------------

    async def create_grant(self, g: Grant) -> Grant:
        """Store a grant for an existing, not revoked peer; at most one live per peer."""
        async with effect_transaction(self.pool) as conn:
            # Lock the peer so two concurrent CreateGrant calls cannot both pass the check.
            cur = await conn.execute(
                "SELECT state FROM peers WHERE name = %s FOR UPDATE", (g.peer,)
            )
            peer = await cur.fetchone()
            if peer is None:
                raise FailedPrecondition(f"peer {g.peer} does not exist; invite it first",
                                         reason="PEER_UNKNOWN")
            if peer["state"] == PeerState.REVOKED:
                raise FailedPrecondition(f"peer {g.peer} is revoked", reason="PEER_REVOKED")
            cur = await conn.execute(
                "SELECT id FROM grants WHERE peer = %s AND revoked_at IS NULL"
                " AND (expire_time IS NULL OR expire_time > now()) LIMIT 1",
                (g.peer,),
            )
            live = await cur.fetchone()
            if live is not None:
                # One live grant per peer keeps "what may this peer see" a single answer.
                raise FailedPrecondition(
                    f"peer {g.peer} already has grant grants/{live['id']}; revoke it first",
                    reason="GRANT_EXISTS",
                )
            cur = await conn.execute(
                f"INSERT INTO grants ({_GRANT_COLUMNS}) VALUES"  # noqa: S608 - fixed columns
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now(), NULL, %s, %s)"
                f" RETURNING {_GRANT_COLUMNS}",
                (uuid.uuid4(), g.peer, sorted(g.kinds), sorted(g.excluded_kinds),
                 sorted(g.workspaces), sorted(g.teams), g.subject_user, g.include_personal,
                 g.row_cap, sorted(g.command_types), sorted(g.event_types), g.rate_per_s,
                 g.burst, g.expire_time, g.row_budget, g.row_budget_window_s),
            )
            row = await cur.fetchone()
        assert row is not None
        return _row_to_grant(row)

    async def get_grant(self, name: str) -> Grant:
        """One grant; NotFound if absent."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_GRANT_COLUMNS} FROM grants WHERE id = %s",  # noqa: S608
                (grant_id(name),),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"grant {name} does not exist")
        return _row_to_grant(row)

    async def list_grants(
        self, *, peer: str, include_revoked: bool, limit: int, after: Sequence[Any] | None
    ) -> list[Grant]:
        """Grants, oldest first."""
        created, gid = after if after else (None, None)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_GRANT_COLUMNS} FROM grants"  # noqa: S608 - fixed columns
                " WHERE (%s = '' OR peer = %s) AND (%s OR revoked_at IS NULL)"
                " AND (%s::timestamptz IS NULL OR (created_at, id) > (%s::timestamptz, %s::uuid))"
                " ORDER BY created_at, id LIMIT %s",
                (peer, peer, include_revoked, created, created, gid, limit),
            )
            rows = await cur.fetchall()
        return [_row_to_grant(r) for r in rows]

    async def revoke_grant(self, name: str) -> Grant:
        """Revoke a grant (idempotent); the next call of its peer no longer finds it."""
        async with effect_transaction(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE grants SET revoked_at = coalesce(revoked_at, now())"  # noqa: S608
                f" WHERE id = %s RETURNING {_GRANT_COLUMNS}",
                (grant_id(name),),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"grant {name} does not exist")
            await conn.execute("SELECT pg_notify(%s, %s)", (GRANTS_CHANNEL, row["peer"]))
        return _row_to_grant(row)
