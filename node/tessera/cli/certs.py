"""`tessera certs enroll|status|renew|revoke`: the node's own certificates."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from tessera import config
from tessera.cli._command import Command, Env
from tessera.cli._output import Printer, enum_name, human_delta, rfc3339
from tessera.core.errors import ConfigError, FailedPrecondition, TesseraError, Unavailable
from tessera.core.paths import NodePaths
from tessera.pki import (
    DevCA,
    Issuer,
    ManagedCertificate,
    StepCAIssuer,
    ensure_enrolled,
    make_stepca_issuer,
    read_status,
    sans_of,
)
from tessera_client.pb import admin_pb2, admin_pb2_grpc


def parse_serial(text: str, *, hex_digits: bool = False) -> int:
    """A certificate serial from the command line; ValueError when it is not one.

    Hex, as `certs status` prints it, when it starts with 0x, holds a letter a-f or
    colons (aa:bb:cc, as openssl prints it), or with --hex; a string of decimal digits
    only is decimal (the leaf's serialNumber as an integer).
    """
    cleaned = text.strip().lower().replace(":", "")
    if cleaned.startswith("0x"):
        hex_digits, cleaned = True, cleaned[2:]
    elif ":" in text or re.search(r"[a-f]", cleaned):
        hex_digits = True
    if not cleaned or not re.fullmatch(r"[0-9a-f]+" if hex_digits else r"[0-9]+", cleaned):
        raise ValueError(f"{text!r} is not a serial (hex as `certs status` shows it, "
                         "0x-prefixed hex, or decimal)")
    serial = int(cleaned, 16 if hex_digits else 10)
    if serial <= 0:
        raise ValueError(f"{text!r} is not a serial (serials are positive)")
    return serial


async def _issuer(cfg: config.Config) -> Issuer:
    if cfg.ca.url:
        return await make_stepca_issuer(cfg)
    if cfg.tls.cert_file:
        raise FailedPrecondition("the node uses fixed files (tls.cert_file); nothing to do here")
    return DevCA(NodePaths(cfg.node.data_dir).dev_ca, cfg.node.trust_domain)


async def _close(issuer: Issuer) -> None:
    if isinstance(issuer, StepCAIssuer):
        await issuer.aclose()


def _enroll(env: Env) -> int:
    """Enrol the node (and local admin/client) with step-ca into data_dir/pki."""
    cfg, out = env.cfg, env.out
    if not cfg.ca.url:
        raise ConfigError("ca.url: set it (and ca.root_fingerprint) to enrol with step-ca")

    async def run() -> list[str]:
        issuer = await make_stepca_issuer(cfg)
        try:
            files = NodePaths(cfg.node.data_dir)
            if env.args.force:
                for f in (files.server, files.admin, files.client):
                    f.cert.unlink(missing_ok=True)
            return await ensure_enrolled(cfg, files, issuer)
        finally:
            await issuer.aclose()

    done = asyncio.run(run())
    pki = NodePaths(cfg.node.data_dir).pki
    if not done:
        out.line(f"certificates in {pki} are valid; nothing to do (--force enrols again)")
    for name in done:
        leaf = x509.load_pem_x509_certificates((pki / f"{name}.crt").read_bytes())[0]
        out.line(f"enrolled {name}: serial {leaf.serial_number:x}, "
              f"valid until {leaf.not_valid_after_utc.isoformat()}")
    return 0


def _describe_file(name: str, cert: Path) -> dict[str, Any]:
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError):
        return {"name": name, "file": str(cert), "error": "missing or not a PEM certificate"}
    now = dt.datetime.now(dt.UTC)
    return {
        "name": name, "file": str(cert), "serial": format(leaf.serial_number, "x"),
        "sans": list(sans_of(leaf)), "not_before": rfc3339(leaf.not_valid_before_utc),
        "not_after": rfc3339(leaf.not_valid_after_utc),
        "seconds_left": int((leaf.not_valid_after_utc - now).total_seconds()),
    }


async def _ask_node(env: Env, rpc: str, request: Any, deadline_s: float) -> Any | None:
    """AdminService.<rpc> on the running node as its local admin; None if no node runs.
    (A channel that follows the admin certificate's renewal, like every client's.)"""
    try:
        channel = env.node().channel()
    except Unavailable:
        return None
    async with channel:
        return await getattr(admin_pb2_grpc.AdminServiceStub(channel), rpc)(
            request, timeout=deadline_s)


async def _live_status(env: Env) -> dict[str, Any] | None:
    """GetCertificateStatus from the running node, with the local admin certificate."""
    try:
        st = await _ask_node(env, "GetCertificateStatus",
                             admin_pb2.GetCertificateStatusRequest(), 3)
    except grpc.aio.AioRpcError as exc:
        return {"error": f"{exc.code().name}: {exc.details()}"}
    if st is None:
        return None
    return {
        "serial": st.serial, "sans": list(st.sans),
        "not_after": rfc3339(st.not_after.ToDatetime(dt.UTC)),
        "renew_time": rfc3339(st.renew_time.ToDatetime(dt.UTC)),
        "state": enum_name(admin_pb2.CertificateStatus.State, st.state).lower(),
        "issuer": st.issuer, "last_error": st.last_error,
    }


def _status(env: Env) -> int:
    """Show serial, SANs, expiry and renewal state; ask the running node when it is up."""
    cfg, out = env.cfg, env.out
    files = NodePaths(cfg.node.data_dir)
    report: dict[str, Any] = {"issuer": "step-ca" if cfg.ca.url else
                              "external" if cfg.tls.cert_file else "dev-ca", "certificates": []}
    for name, f in (("node", files.server), ("admin", files.admin), ("client", files.client)):
        entry = _describe_file(name, f.cert)
        renewal = read_status(f)
        if renewal is not None and "serial" in entry:
            entry["renewal"] = {"state": renewal.state.value,
                                "renew_at": rfc3339(renewal.renew_at),
                                "last_error": renewal.last_error,
                                "renewals": renewal.renewals}
        report["certificates"].append(entry)
    report["node"] = asyncio.run(_live_status(env))
    out.result(report, lambda: _print_status(out, report))
    return 0


def _print_status(out: Printer, report: dict[str, Any]) -> None:
    out.line(f"issuer: {report['issuer']}")
    for e in report["certificates"]:
        if "error" in e:
            out.line(f"{e['name']:7} {e['file']}: {e['error']}")
            continue
        out.line(f"{e['name']:7} serial {e['serial']}")
        out.line(f"        SANs       {', '.join(e['sans'])}")
        left = e["seconds_left"]
        when = f"in {human_delta(left)}" if left > 0 else f"expired {human_delta(left)} ago"
        out.line(f"        expires    {e['not_after']} ({when})")
        r = e.get("renewal")
        if r:
            out.line(f"        renewal    {r['state']}, next at {r['renew_at']}, "
                  f"{r['renewals']} done" + (f", last error: {r['last_error']}"
                                              if r["last_error"] else ""))
    live = report["node"]
    if live is None:
        out.line("node: not running (no node.json or admin certificate)")
    elif "error" in live:
        out.line(f"node: not reachable ({live['error']})")
    else:
        out.line(f"node: serving serial {live['serial']}, state {live['state']}, "
              f"renews at {live['renew_time']}"
              + (f", last error: {live['last_error']}" if live["last_error"] else ""))


def _renew(env: Env) -> int:
    """Renew now: through the running node (RotateCertificate), else the files directly."""
    cfg, out = env.cfg, env.out
    paths = NodePaths(cfg.node.data_dir)

    async def via_node() -> str | None:
        try:
            st = await _ask_node(env, "RotateCertificate", admin_pb2.RotateCertificateRequest(),
                                 30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE and "rotation" not in (
                    exc.details() or ""):
                return None  # node not running
            raise TesseraError(f"the node refused: {exc.details()}") from None
        return None if st is None else str(st.serial)

    async def offline() -> str:
        issuer = await _issuer(cfg)
        try:
            m = ManagedCertificate("node", paths.server, issuer,
                                   renew_fraction=cfg.ca.renew_fraction,
                                   can_reenrol=not isinstance(issuer, StepCAIssuer)
                                   or issuer.has_provisioner)
            return format((await m.renew_now()).serial, "x")
        finally:
            await _close(issuer)

    serial = asyncio.run(via_node())
    if serial is not None:
        out.line(f"the running node now serves serial {serial}")
        return 0
    out.line(f"renewed {paths.server.cert}: serial {asyncio.run(offline())} "
          "(the node was not running)")
    return 0


def _own_serials(files: NodePaths) -> dict[str, tuple[int, tuple[int, ...], str]]:
    """For node, admin and client: (current serial, earlier serials, identity URI)."""
    out: dict[str, tuple[int, tuple[int, ...], str]] = {}
    for name, f in (("node", files.server), ("admin", files.admin), ("client", files.client)):
        try:
            leaf = x509.load_pem_x509_certificates(f.cert.read_bytes())[0]
        except (OSError, ValueError):
            continue
        status = read_status(f)
        uris = [v for v in sans_of(leaf) if v.startswith("spiffe://")]
        out[name] = (leaf.serial_number, status.previous_serials if status else (),
                     uris[0] if uris else "")
    return out


def _revoke(env: Env) -> int:
    """Revoke a serial at the CA and put it on this node's deny list.

    When the serial is one of the node's own current certificates, the running node
    re-enrols that identity at once with a new key, unless --decommission retires it.
    """
    args, cfg, out = env.args, env.cfg, env.out
    identity = ""
    if args.cert:
        leaf = x509.load_pem_x509_certificates(Path(args.cert).read_bytes())[0]
        serial = leaf.serial_number
        identity = next((v for v in sans_of(leaf) if v.startswith("spiffe://")), "")
    elif args.serial:
        try:
            serial = parse_serial(args.serial, hex_digits=args.hex)
        except ValueError as exc:
            raise ConfigError(f"certs revoke: {exc}") from None
    else:
        raise ConfigError("certs revoke: give a SERIAL or --cert FILE")
    from tessera.pki import DenyList

    files = NodePaths(cfg.node.data_dir)
    before = _own_serials(files)

    async def run() -> None:
        issuer = await _issuer(cfg)
        try:
            await issuer.revoke(serial, reason=args.reason)
        finally:
            await _close(issuer)

    if args.decommission:
        # Before the deny list: the running node must never see the serial revoked
        # without also seeing that it is retired, or it would heal it.
        DenyList(files.decommissioned).add([serial])
    # Deny first: if the CA cannot be reached the node still refuses the certificate.
    DenyList(files.deny_list).add([serial])
    # Both forms, so an operator sees which reading of an all-digit serial was taken.
    out.line(f"serial {serial:x} (decimal {serial}) is on the deny list {files.deny_list}")
    _share_revocation(out, cfg, serial, args.reason)
    asyncio.run(run())
    out.line(f"serial {serial:x} revoked at the CA")
    _say_what_is_in_force(out, serial, identity, before, _own_serials(files),
                          args.decommission)
    return 0


def _say_what_is_in_force(out: Printer, serial: int, identity: str,
                          before: dict[str, tuple[int, tuple[int, ...], str]],
                          after: dict[str, tuple[int, tuple[int, ...], str]],
                          decommission: bool) -> None:
    """Tell the operator whether the revoked serial was one of the node's own and what
    certificate of that identity is in force now (a renewal may have raced the revoke)."""
    for name, (current, earlier, uri) in before.items():
        now_serial = after.get(name, (current, (), uri))[0]
        was_current = serial == current
        was_earlier = serial in earlier or (identity == uri and not was_current)
        if not (was_current or was_earlier):
            continue
        if was_current and now_serial == serial:
            if decommission:
                out.line(f"{name} ({uri}) is decommissioned: the node will not re-enrol it; "
                      "`tessera certs enroll --force` enrols it again")
            else:
                out.line(f"serial {serial:x} was the node's current {name} certificate: the "
                      f"running node re-enrols {name} with a new key at once "
                      "(--decommission retires an identity instead)")
        else:
            out.line(f"serial {serial:x} was an earlier {name} certificate; a newer one, serial "
                  f"{now_serial:x}, is in force for {uri} and was not revoked")


def _share_revocation(out: Printer, cfg: config.Config, serial: int, reason: str) -> None:
    """Tell every replica sharing the database at once, and wait until each confirms.

    The database is store.dsn, or the embedded PostgreSQL of this data directory when the
    node runs; without either, the node polls its deny-list file (within a second).
    """
    import psycopg

    from tessera.app import running_dsn
    from tessera.pki import record_revocation_at
    from tessera.store import redact_dsn

    dsn = running_dsn(cfg)
    if not dsn:
        out.line("no database to announce it on (store.dsn unset, no embedded node running): "
              "a node started on this data directory refuses it from its start")
        return
    try:
        delivery = asyncio.run(record_revocation_at(dsn, serial, reason,
                                                    timeout_s=cfg.ca.timeout_s))
    except (psycopg.Error, OSError) as exc:
        # Not fatal: the node using this data directory reads its deny-list file within a
        # second and pushes it to the table, and the CA revocation below still happens.
        out.warn(f"warning: could not record serial {serial:x} in revoked_certificates at "
                 f"{redact_dsn(dsn)} ({type(exc).__name__}); the node of this data directory "
                 "refuses it within a second, other replicas once it syncs its deny list")
        return
    if delivery.complete:
        out.line(f"serial {serial:x} is refused by every replica sharing the database "
              f"({delivery.acknowledged} of {delivery.listeners} confirmed)")
    else:
        out.warn(f"warning: serial {serial:x} confirmed by {delivery.acknowledged} of "
                 f"{delivery.listeners} replicas; the others refuse it once they reload the "
                 "table (at most 30 s)")




def _enroll_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="enrol even if the files are valid")


def _revoke_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("serial", nargs="?",
                   help="serial: hex as `certs status` shows it (0x prefix, a-f or colons "
                        "mark hex), otherwise decimal; --hex for all-digit hex")
    p.add_argument("--hex", action="store_true",
                   help="read the serial as hex even if it has only the digits 0-9")
    p.add_argument("--cert", help="revoke the certificate in this PEM file")
    p.add_argument("--reason", default="", help="reason recorded at the CA")
    p.add_argument("--decommission", action="store_true",
                   help="retire the identity: the node does not re-enrol a revoked "
                        "certificate of its own")


ENROLL = Command("enrol with step-ca (ca.url) into data_dir/pki", _enroll, flags=_enroll_flags)
STATUS = Command("serial, SANs, expiry and renewal state", _status, json=True)
RENEW = Command("renew the node certificate now", _renew)
REVOKE = Command("revoke a certificate and deny it on this node", _revoke, flags=_revoke_flags)
