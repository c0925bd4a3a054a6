"""Revoked serials shared by every replica of a deployment through PostgreSQL.

The deny-list file lives in one data directory, but replicas behind one database serve
the same identities: a serial revoked through any of them must be refused by all. Each
node keeps the table `revoked_certificates` and its in-memory deny set in step:

- a revocation is written to the table and announced with NOTIFY on `CHANNEL`;
- every node LISTENs (on a connection named `LISTENER_APP`) and adds an announced serial
  to its set at once, then acknowledges it on `ACK_CHANNEL`; `tessera certs revoke`
  counts the listeners, waits for their acknowledgements and says whether all came, so
  when it returns every replica listening refuses the serial on its next call;
- every `REFRESH_S` seconds (and after a lost LISTEN connection) a node pushes the
  serials of its own deny-list file that the table lacks, then reloads the whole table.
  The reload is the fallback for a missed notification, and the push carries revocations
  made while the database was unreachable (or by `tessera certs revoke` without a DSN).

The per-call check stays a lookup in an in-memory set; the database is never on the
call path. A database outage leaves the last loaded set in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tessera.pki._denylist import DenyList

log = logging.getLogger(__name__)

#: NOTIFY channel; the payload is one serial in lowercase hex.
CHANNEL = "tessera_revocations"
#: Acknowledgements: payload "<serial hex> <backend pid of the LISTEN connection>", sent
#: once the serial is denied; the revoker counts only the connections it saw listening.
ACK_CHANNEL = "tessera_revocations_applied"
#: application_name of the LISTEN connections, so a revoker can count the replicas.
LISTENER_APP = "tessera-revocations"
#: Seconds `record_revocation_at` waits for the listeners' acknowledgements by default.
ACK_WAIT_S = 5.0
#: Seconds between full reloads of the table (the fallback for missed notifications).
REFRESH_S = 30.0
#: Longest wait before reconnecting a lost LISTEN connection.
_MAX_BACKOFF_S = 30.0


def _hex(serial: int) -> str:
    return format(serial, "x")


async def record_revocations(
    conn: psycopg.AsyncConnection[Any], serials: Iterable[int], reason: str = ""
) -> list[int]:
    """Insert serials (skipping known ones) and announce the new ones; returns those."""
    wanted = sorted({_hex(int(s)) for s in serials})
    if not wanted:
        return []
    cur = await conn.execute(
        "INSERT INTO revoked_certificates (serial, reason)"
        " SELECT s, %s FROM unnest(%s::text[]) AS s"
        " ON CONFLICT (serial) DO NOTHING RETURNING serial",
        (reason, wanted),
    )
    added = [str(_value(row)) for row in await cur.fetchall()]
    if added:
        await conn.execute("SELECT pg_notify(%s, s) FROM unnest(%s::text[]) AS s",
                           (CHANNEL, added))
    return [int(s, 16) for s in added]


@dataclass(frozen=True)
class Delivery:
    """How far a revocation got: the replicas listening and those that confirmed it."""

    listeners: int
    acknowledged: int

    @property
    def complete(self) -> bool:
        """Every replica listening when it was announced has denied the serial."""
        return self.acknowledged >= self.listeners


async def record_revocation_at(dsn: str, serial: int, reason: str, *,
                               timeout_s: float = 10.0,
                               ack_wait_s: float = ACK_WAIT_S) -> Delivery:
    """Record one revocation (for the CLI), announce it, and wait until every replica
    listening on the database has confirmed that it denies the serial."""
    async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=max(1, int(timeout_s))) as conn:
        await conn.execute(f"LISTEN {ACK_CHANNEL}")
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND datname = current_database()", (LISTENER_APP,))
        # Only these may confirm: a replica started meanwhile must not stand in for one
        # counted here that never applies the serial.
        counted = {str(row[0]) for row in await cur.fetchall()}
        added = await record_revocations(conn, [serial], reason)
        if not added:  # already in the table: announce it again so the replicas confirm
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, _hex(serial)))
        acked: set[str] = set()
        if counted:
            async for note in conn.notifies(timeout=ack_wait_s):
                who = note.payload.partition(" ")
                if who[0] == _hex(serial) and who[2] in counted:
                    acked.add(who[2])
                    if acked >= counted:
                        break
        return Delivery(len(counted), len(acked))


async def load_revocations(conn: psycopg.AsyncConnection[Any]) -> frozenset[int]:
    """Every serial in the table."""
    cur = await conn.execute("SELECT serial FROM revoked_certificates")
    serials: set[int] = set()
    for row in await cur.fetchall():
        try:
            serials.add(int(str(_value(row)), 16))
        except ValueError:
            log.warning("revoked_certificates: ignoring a serial that is not hex")
    return frozenset(serials)


def _value(row: Any) -> Any:
    # The pool's connections return dicts, a plain connection returns tuples.
    return row["serial"] if isinstance(row, dict) else row[0]


class SharedRevocations:
    """Keeps a DenyList's shared set in step with the table (see the module docstring)."""

    def __init__(self, deny: DenyList, pool: AsyncConnectionPool[Any], dsn: str, *,
                 refresh_s: float = REFRESH_S) -> None:
        self.deny = deny
        self.pool = pool
        self.dsn = dsn
        self.refresh_s = refresh_s
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Serials announced while a full load runs; the load's snapshot may predate them.
        self._announced: set[int] = set()
        self._acks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Push and reload soon (safe from any thread): a serial was added locally."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def sync(self) -> None:
        """Push local serials the table lacks, then reload the table."""
        self.deny.reload()
        async with self.pool.connection() as conn:
            missing = self.deny.listed - self.deny.shared
            if missing:
                await record_revocations(conn, missing, "deny list of a replica")
            self._announced.clear()
            loaded = await load_revocations(conn)
            self.deny.set_shared(loaded | self._announced)

    async def start(self) -> list[asyncio.Task[None]]:
        """Sync once (a failure is logged, the file list stays in force), then run."""
        self._loop = asyncio.get_running_loop()
        try:
            await self.sync()
        except (psycopg.Error, OSError) as exc:
            log.warning("could not load revoked_certificates (%s); retrying in the background",
                        type(exc).__name__)
        return [asyncio.create_task(self._refresher()), asyncio.create_task(self._listener())]

    async def _refresher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.refresh_s)
            self._wake.clear()
            try:
                await self.sync()
            except (psycopg.Error, OSError) as exc:
                log.warning("revoked_certificates not refreshed (%s); the serials loaded "
                            "before stay denied", type(exc).__name__)

    async def _ack(self, serial_hex: str, listener_pid: int) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, %s)",
                                   (ACK_CHANNEL, f"{serial_hex} {listener_pid}"))
        except (psycopg.Error, OSError) as exc:
            log.warning("could not acknowledge revoked serial %s (%s)", serial_hex,
                        type(exc).__name__)

    async def _listener(self) -> None:
        backoff = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True, application_name=LISTENER_APP) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    pid = conn.info.backend_pid  # names this listener to the revoker
                    backoff = 1.0
                    # Notifications sent while we were not listening are lost: reload.
                    self._wake.set()
                    async for note in conn.notifies():
                        try:
                            serial = int(note.payload, 16)
                        except ValueError:
                            self._wake.set()  # not a serial: reload everything
                            continue
                        self._announced.add(serial)
                        self.deny.add_shared([serial])
                        # Denied from here on: tell the revoker (over the pool, since
                        # this connection is busy listening).
                        task = asyncio.create_task(self._ack(note.payload, pid))
                        self._acks.add(task)
                        task.add_done_callback(self._acks.discard)
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN %s lost (%s); reconnecting in %.0f s", CHANNEL,
                            type(exc).__name__, backoff)
            await asyncio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)
