"""Writes with an effect: the effect and its audit record commit in one transaction.

Any store function that changes state on a caller's behalf (a command, a publish, an admin
change) opens its transaction with `effect_transaction(pool)`. When the body has run, the
current call's audit record (`AuditIntent.payload()`, built at that moment) is inserted
into `audit_unlinked` in the same transaction, with synchronous commit: either the effect
and its record are both durable, or neither is. The audit writer later chains the row into
`audit_log` (see migration 0009). The call path binds each call's intent
(`bind_audit_intent`); code outside a call (or with audit off) has none and gets a plain
transaction. A body that finds nothing to change should raise inside the transaction, so
no success is recorded for it.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

from tessera.core.errors import Unavailable


class AuditIntent(Protocol):
    """The audit record of the call in progress, for an effect to commit with."""

    def payload(self) -> bytes:
        """The record's payload as it stands now (the call as succeeded so far)."""
        ...

    def committed(self) -> None:
        """Told once the effect and this record have committed together."""
        ...

    @property
    def is_committed(self) -> bool:
        """True once the record committed with an effect (a later effect adds no row)."""
        ...


_INTENT: contextvars.ContextVar[AuditIntent | None] = contextvars.ContextVar(
    "tessera_audit_intent", default=None)


def audit_intent() -> AuditIntent | None:
    """The audit record of the call being served, if it is audited."""
    return _INTENT.get()


def bind_audit_intent(intent: AuditIntent | None) -> None:
    """Make `intent` the current call's pending audit record (the call path's job)."""
    _INTENT.set(intent)


class Current:
    """The default of `effect_transaction`: the intent the call path bound."""


CURRENT: Final = Current()


async def write_pending_audit(conn: psycopg.AsyncConnection[Any], audit: AuditIntent) -> None:
    """Insert the call's audit record inside the caller's transaction."""
    try:
        await conn.execute("SELECT tessera_audit_pending(%b)", (audit.payload(),))
    except psycopg.Error as exc:
        # The transaction (and the effect in it) rolls back as this propagates.
        raise Unavailable(
            "the audit log could not be written, so the change was not made; retry "
            f"({type(exc).__name__})"
        ) from None


@asynccontextmanager
async def effect_transaction(
    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]],
    audit: AuditIntent | Current | None = CURRENT,
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction whose effect commits only together with its audit record.

    `audit` defaults to the current call's intent. With None (audit switched off, no call,
    or the record already committed with an earlier effect of the call) it is a plain
    transaction. If the body raises, nothing is written and the call path records the
    failure as for any call.
    """
    if isinstance(audit, Current):
        audit = _INTENT.get()
    if audit is not None and audit.is_committed:
        audit = None
    async with pool.connection() as conn:
        async with conn.transaction():
            yield conn
            if audit is not None:
                await write_pending_audit(conn, audit)
        if audit is not None:
            audit.committed()
