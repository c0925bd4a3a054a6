"""Health checks of the node's dependencies, with actionable, credential-free messages."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509

from tessera.core.checks import Check, Level
from tessera.peering import PeerCertStatus
from tessera.pki import CertificateStatus, StepCAError, StepCAIssuer
from tessera.store import Follow, redact_dsn

#: A certificate closer to expiry than this is yellow.
CERT_WARN = dt.timedelta(days=7)


async def check_postgres(dsn: str, *, timeout_s: float = 5.0) -> list[Check]:
    """PostgreSQL reachable, and pgvector installed in it."""
    shown = redact_dsn(dsn)
    try:
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(dsn, autocommit=True), timeout_s
        )
    except (psycopg.Error, TimeoutError, OSError) as exc:
        kind = "timed out" if isinstance(exc, TimeoutError) else "failed"
        return [
            Check("postgresql", Level.RED,
                  f"connection to {shown} {kind}; check store.dsn, that the server is running "
                  "and accepts this user"),
            Check("pgvector", Level.RED, "not checked: PostgreSQL is unreachable"),
        ]
    async with conn:
        cur = await conn.execute("SHOW server_version")
        row = await cur.fetchone()
        version = row[0] if row else "?"
        cur = await conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        )
        ext = await cur.fetchone()
        cur = await conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        )
        avail = await cur.fetchone()
    checks = [Check("postgresql", Level.GREEN, f"PostgreSQL {version} at {shown}",
                    {"version": version})]
    if ext is not None:
        checks.append(Check("pgvector", Level.GREEN, f"pgvector {ext[0]} installed",
                            {"version": ext[0]}))
    elif avail is not None:
        checks.append(Check("pgvector", Level.YELLOW,
                            f"pgvector {avail[0]} is available but not created yet; "
                            "run `tessera migrate` (or start the node) to create it"))
    else:
        checks.append(Check("pgvector", Level.RED,
                            "the pgvector extension is not installed on this PostgreSQL; "
                            "install pgvector 0.8 or later on the server"))
    return checks


async def check_valkey(url: str, *, timeout_s: float = 2.0) -> Check:
    """Valkey answers PING."""
    import redis.asyncio as redis
    from redis.exceptions import RedisError

    shown = redact_dsn(url)
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        info = await client.info("server")
        version = str(info.get("valkey_version") or info.get("redis_version") or "?")
        return Check("valkey", Level.GREEN, f"Valkey {version} at {shown}", {"version": version})
    except (RedisError, OSError, TimeoutError):
        return Check("valkey", Level.RED,
                     f"Valkey at {shown} does not answer; check valkey.url and that it runs "
                     "(the node falls back to a local rate limiter meanwhile)")
    finally:
        await client.aclose()


def check_certificate(name: str, cert_path: Path, key_path: Path,
                      *, now: dt.datetime | None = None) -> Check:
    """A certificate exists, its key is private, and it is not close to expiry."""
    now = now or dt.datetime.now(dt.UTC)
    if not cert_path.exists():
        return Check(name, Level.RED, f"{cert_path} does not exist; start the node once or "
                     "run `tessera certs enroll`")
    try:
        leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    except ValueError:
        return Check(name, Level.RED, f"{cert_path} is not a PEM certificate")
    left = leaf.not_valid_after_utc - now
    days = round(left.total_seconds() / 86400, 2)
    details = {"serial": format(leaf.serial_number, "x"),
               "not_after": leaf.not_valid_after_utc.isoformat(), "days_left": days}
    if key_path.exists() and key_path.stat().st_mode & 0o077:
        return Check(name, Level.RED, f"{key_path} is readable by others; chmod 600 it", details)
    if left <= dt.timedelta(0):
        return Check(name, Level.RED, f"expired {-days} days ago; renew it "
                     "(`tessera certs renew`) or restart the node to re-issue", details)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    # Short-lived (step-ca) certificates are renewed at 2/3 of their life: warn once a
    # quarter of the lifetime is all that is left, i.e. renewal is overdue.
    if left < min(CERT_WARN, lifetime / 4):
        return Check(name, Level.YELLOW, f"expires in {days} days ({int(left.total_seconds())} s);"
                     " renewal is due", details)
    if left < dt.timedelta(days=1):
        return Check(name, Level.GREEN, f"valid for {int(left.total_seconds())} more seconds",
                     details)
    return Check(name, Level.GREEN, f"valid for {days} more days", details)


def check_renewal(name: str, status: CertificateStatus,
                  *, now: dt.datetime | None = None) -> Check:
    """The renewal state a running node reports: degraded is yellow, expired red."""
    now = now or dt.datetime.now(dt.UTC)
    details: dict[str, Any] = {
        "state": status.state.value, "serial": format(status.serial, "x"),
        "renew_at": status.renew_at.isoformat(), "not_after": status.not_after.isoformat(),
        "issuer": status.issuer, "renewals": status.renewals, "failures": status.failures,
    }
    if status.last_error:
        details["last_error"] = status.last_error
    if status.state.value == "expired" or status.not_after <= now:
        return Check(name, Level.RED, f"{status.name} certificate expired and renewal fails "
                     f"({status.last_error or 'no attempt yet'}); check the CA", details)
    if status.state.value == "degraded":
        left = int((status.not_after - now).total_seconds())
        return Check(name, Level.YELLOW, f"renewal of the {status.name} certificate failing "
                     f"{status.failures}x, retrying; expires in {left} s "
                     f"({status.last_error})", details)
    return Check(name, Level.GREEN, f"{status.issuer} renews it at "
                 f"{status.renew_at.isoformat(timespec='seconds')}", details)


async def check_stepca(issuer: StepCAIssuer, *, timeout_s: float = 5.0,
                       soonest_expiry: dt.datetime | None = None) -> Check:
    """step-ca answers /health (over TLS pinned to its root): yellow while it does not, so
    an outage shows before a renewal fails."""
    url = issuer.client.ca_url
    try:
        await asyncio.wait_for(issuer.client.health(), timeout_s)
    except (StepCAError, TimeoutError, OSError) as exc:
        left = ""
        if soonest_expiry is not None:
            secs = int((soonest_expiry - dt.datetime.now(dt.UTC)).total_seconds())
            left = f"; the soonest certificate expires in {secs} s"
        what = exc.message if isinstance(exc, StepCAError) else type(exc).__name__
        return Check("step-ca", Level.YELLOW,
                     f"step-ca at {url} does not answer /health ({what}): renewals and "
                     f"re-enrolments fail while it is down{left}; check that it runs and "
                     "that ca.url reaches it", {"url": url})
    return Check("step-ca", Level.GREEN, f"step-ca at {url} is healthy", {"url": url})


def renewal_check_name(identity: str) -> str:
    """Doctor's name for the renewal check of the node's (or a local) identity."""
    return "certificate-renewal" if identity == "node" else f"certificate-renewal:{identity}"


def check_peer_certificate(status: PeerCertStatus, *, now: dt.datetime | None = None) -> Check:
    """The certificate this node holds for calling one peer, renewed through that peer."""
    now = now or dt.datetime.now(dt.UTC)
    name = f"peer-certificate:{status.name}"
    left = status.not_after - now
    details: dict[str, Any] = {
        "peer": status.name, "serial": format(status.serial, "x"),
        "not_after": status.not_after.isoformat(), "renew_at": status.renew_at.isoformat(),
        "state": status.state.value, "renewals": status.renewals, "failures": status.failures,
        "seconds_left": int(left.total_seconds()),
    }
    if status.last_error:
        details["last_error"] = status.last_error
    if left <= dt.timedelta(0):
        why = status.last_error or "no renewal attempt"
        return Check(name, Level.RED, f"the certificate for calling peer {status.name} expired; "
                     f"calls to it fail until it is joined again ({why})", details)
    if status.failures or left < status.lifetime / 6:
        return Check(name, Level.YELLOW, f"renewal through peer {status.name} is failing or "
                     f"overdue; expires in {int(left.total_seconds())} s"
                     + (f" ({status.last_error})" if status.last_error else ""), details)
    until = status.not_after.isoformat(timespec="seconds")
    renew = status.renew_at.isoformat(timespec="seconds")
    return Check(name, Level.GREEN, f"valid until {until}, renewed through the peer at {renew}",
                 details)


#: A followed peer whose stream has been down this long is red, not yellow.
FOLLOW_DOWN_RED = dt.timedelta(minutes=10)


def check_follow(follow: Follow, *, now: dt.datetime | None = None) -> Check:
    """One followed peer: connected (green), reconnecting (yellow; red after a while)."""
    now = now or dt.datetime.now(dt.UTC)
    name = f"follow:{follow.peer}"
    details: dict[str, Any] = {
        "peer": follow.peer, "state": follow.state, "received": follow.received,
        "duplicates": follow.duplicates, "patterns": list(follow.type_patterns),
        "cursor": follow.cursor,
    }
    if follow.last_received_at is not None:
        details["last_received"] = follow.last_received_at.isoformat()
    if follow.last_event_time is not None and follow.last_received_at is not None:
        details["lag_seconds"] = max(
            0.0, (follow.last_received_at - follow.last_event_time).total_seconds())
    if follow.last_error:
        details["last_error"] = follow.last_error
    if follow.state in ("connected", "standby"):
        return Check(name, Level.GREEN, f"following peer {follow.peer} ({follow.state}); "
                     f"{follow.received} events stored", details)
    since = now - follow.updated_at
    level = Level.RED if follow.state == "backoff" and since > FOLLOW_DOWN_RED else Level.YELLOW
    why = f" ({follow.last_error})" if follow.last_error else ""
    return Check(name, level, f"following peer {follow.peer} is {follow.state}{why}; the "
                 "follower reconnects by itself with backoff; check the peer is up and this "
                 "node's grant there lists event types", details)


@dataclass(frozen=True)
class Dependencies:
    """What the node depends on, as a running node or the CLI beside it finds it."""

    #: The database; None with the message saying why there is none.
    dsn: str | None
    valkey_url: str | None
    #: (check name, certificate, key) of each certificate to look at.
    certificates: Sequence[tuple[str, Path, Path]]
    #: Renewal state of the node's own identities (node, admin, client).
    renewals: Mapping[str, CertificateStatus] = field(default_factory=dict)
    #: The step-ca issuer to probe, if the node uses one.
    stepca: StepCAIssuer | None = None
    stepca_timeout_s: float = 5.0
    missing_dsn: str = "store.dsn is not set"
    missing_valkey: str = "valkey.url is not set"


async def check_dependencies(deps: Dependencies) -> list[Check]:
    """PostgreSQL, pgvector, Valkey, certificates, their renewal and step-ca, in that order."""
    if deps.dsn:
        checks = await check_postgres(deps.dsn)
    else:
        checks = [Check("postgresql", Level.RED, deps.missing_dsn),
                  Check("pgvector", Level.RED, "not checked: PostgreSQL is not running")]
    checks.append(await check_valkey(deps.valkey_url) if deps.valkey_url
                  else Check("valkey", Level.RED, deps.missing_valkey))
    checks += [check_certificate(name, cert, key) for name, cert, key in deps.certificates]
    checks += [check_renewal(renewal_check_name(name), status)
               for name, status in deps.renewals.items()]
    if deps.stepca is not None:
        soonest = min((st.not_after for st in deps.renewals.values()), default=None)
        checks.append(await check_stepca(deps.stepca, timeout_s=deps.stepca_timeout_s,
                                         soonest_expiry=soonest))
    return checks
