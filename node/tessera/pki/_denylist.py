"""The node's deny list: revoked certificate serials, checked on every call.

Three sources feed it: serials revoked through this node (a file under the data
directory, one decimal serial per line), serials revoked through any replica sharing the
database (`_revocations.py` keeps them in step), and the serials of a CRL taken from a
file or URL. A CRL that cannot be read, fetched or verified leaves the previous one in force:
a transient failure never marks anything revoked, and never un-revokes anything either.

A CRL is only put in force when it is signed by a trusted CA, has not passed its
next_update, and is not older than the CRL in force (last_update, and the CRL Number
when both carry one). Because of those checks a CRL may come over plain http: an
attacker on the path can withhold a CRL (which is logged) but cannot replay an older one
to un-revoke a serial. The last CRL put in force is stored under the data directory and
loaded again at start, so a restart while the CRL source is down keeps every revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tessera.core.redact import redact_url
from tessera.pki._files import write_atomic

log = logging.getLogger(__name__)

#: How often a call may look at the deny-list file for changes made by another process.
_FILE_CHECK_S = 1.0
#: Re-read the deny-list file at least this often even when stat() shows no change, in
#: case a rewrite reused the inode and kept mtime and size (coarse timestamps).
_FILE_FORCE_S = 30.0
#: Largest CRL body the node downloads; a bigger answer is refused, not truncated.
MAX_CRL_BYTES = 10 * 1024 * 1024

_Stamp = tuple[int, int, int, int]




@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on a sidecar file: serialises read-merge-write across processes
    (`tessera certs revoke` and the running node) and threads (each opens its own fd)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last fd of the open file description releases the lock


def _stamp(st: os.stat_result) -> _Stamp:
    # mtime alone misses a second write within the filesystem's timestamp granularity;
    # atomic replaces give every version a new inode, and the size usually changes too.
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


class DenyList:
    """A live `Container[int]` of refused serials: the file's plus the CRL's."""

    def __init__(self, path: Path, *, trusted_pem: bytes = b"",
                 crl_store: Path | None = None) -> None:
        self.path = path
        #: Certificates a CRL must be signed by (roots and intermediates).
        self.trusted_pem = trusted_pem
        #: Where the CRL in force is kept across restarts (None: not kept).
        self.crl_store = crl_store
        self._listed: frozenset[int] = frozenset()
        self._shared: frozenset[int] = frozenset()
        self._crl: frozenset[int] = frozenset()
        #: Called after `add` (the shared table is told about local revocations).
        self.on_add: Callable[[], None] | None = None
        self._crl_in_force: x509.CertificateRevocationList | None = None
        self._stamp: _Stamp | None = None
        self._checked = 0.0
        self._forced = 0.0
        self._reload_file()
        self._load_stored_crl()

    def __contains__(self, serial: object) -> bool:
        # `tessera certs revoke` may add a serial from another process; notice it
        # within a second without a stat() on every call.
        now = time.monotonic()
        if now - self._checked >= _FILE_CHECK_S:
            self._checked = now
            force = now - self._forced >= _FILE_FORCE_S
            if force:
                self._forced = now
            self._reload_file(force=force)
        return serial in self._listed or serial in self._shared or serial in self._crl

    @property
    def listed(self) -> frozenset[int]:
        """Serials revoked through this node."""
        return self._listed

    @property
    def shared(self) -> frozenset[int]:
        """Serials revoked through any replica (the database's table)."""
        return self._shared

    def set_shared(self, serials: frozenset[int]) -> None:
        """Replace the shared set with a full load of the table."""
        self._shared = serials

    def add_shared(self, serials: Iterable[int]) -> None:
        """Add serials announced by another replica."""
        self._shared = self._shared | frozenset(serials)

    def reload(self) -> None:
        """Read the deny-list file now (if it changed)."""
        self._reload_file()

    @property
    def crl_serials(self) -> frozenset[int]:
        """Serials of the CRL in force."""
        return self._crl

    @property
    def crl_in_force(self) -> x509.CertificateRevocationList | None:
        """The CRL whose serials are refused, if any."""
        return self._crl_in_force

    def crl_fresh(self, now: dt.datetime | None = None) -> bool:
        """True when a CRL is in force and has not passed its next_update."""
        crl = self._crl_in_force
        if crl is None:
            return False
        nxt = crl.next_update_utc
        return nxt is None or (now or dt.datetime.now(dt.UTC)) < nxt

    def add(self, serials: Iterable[int]) -> None:
        """Deny these serials from now on and persist them."""
        new = {int(s) for s in serials}
        # Under the lock, re-read and merge: a concurrent adder's serials are never lost.
        with _file_lock(self.path):
            self._reload_file(force=True)
            merged = self._listed | new
            write_atomic(self.path, "".join(f"{s}\n" for s in sorted(merged)).encode())
            self._listed = merged
            self._stamp = _stamp(self.path.stat())
        if self.on_add is not None:
            self.on_add()

    def _reload_file(self, *, force: bool = False) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._listed, self._stamp = frozenset(), None
            return
        stamp = _stamp(st)
        if stamp == self._stamp and not force:
            return
        serials: set[int] = set()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                serials.add(int(entry, 16) if entry.lower().startswith("0x") else int(entry))
            except ValueError:
                log.warning("deny list %s: ignoring a line that is not a serial", self.path)
        self._listed, self._stamp = frozenset(serials), stamp

    def _load_stored_crl(self) -> None:
        if self.crl_store is None:
            return
        try:
            data = self.crl_store.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("stored CRL %s unreadable (%s)", self.crl_store, type(exc).__name__)
            return
        try:
            crl = parse_crl(data, self.trusted_pem, source=str(self.crl_store))
        except ValueError as exc:
            log.error("stored CRL not used: %s", exc)
            return
        # Even an expired stored CRL keeps its serials refused: a node never un-revokes.
        self._crl_in_force = crl
        self._crl = frozenset(r.serial_number for r in crl)
        if not self.crl_fresh():
            log.warning("stored CRL %s passed its next_update (%s)", self.crl_store,
                        crl.next_update_utc)

    def set_crl(self, crl_bytes: bytes, *, source: str, now: dt.datetime | None = None) -> int:
        """Put a verified, current CRL in force; raise ValueError (keeping the old one)
        if it is badly signed, expired or older than the CRL in force."""
        source = redact_url(source)
        crl = parse_crl(crl_bytes, self.trusted_pem, source=source)
        now = now or dt.datetime.now(dt.UTC)
        nxt = crl.next_update_utc
        if nxt is not None and nxt <= now:
            raise ValueError(f"CRL from {source} expired at {nxt.isoformat()} (next_update)")
        current = self._crl_in_force
        if current is not None:
            _check_not_older(crl, current, source)
        der = crl.public_bytes(serialization.Encoding.DER)
        if self.crl_store is not None and (
                current is None or current.public_bytes(serialization.Encoding.DER) != der):
            # Stored before it is in force: after a crash the node restarts with it.
            write_atomic(self.crl_store, der)
        self._crl_in_force = crl
        self._crl = frozenset(r.serial_number for r in crl)
        return len(self._crl)


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _check_not_older(new: x509.CertificateRevocationList,
                     current: x509.CertificateRevocationList, source: str) -> None:
    """Raise ValueError when `new` would roll the CRL in force back (a replay)."""
    if new.last_update_utc < current.last_update_utc:
        raise ValueError(
            f"CRL from {source} (last_update {new.last_update_utc.isoformat()}) is older "
            f"than the CRL in force ({current.last_update_utc.isoformat()})")
    # CRL Numbers only order the CRLs of one issuer (a new intermediate starts again).
    new_no, cur_no = _crl_number(new), _crl_number(current)
    if new.issuer == current.issuer and new_no is not None and cur_no is not None \
            and new_no < cur_no:
        raise ValueError(
            f"CRL from {source} has CRL Number {new_no}, lower than {cur_no} in force")


def parse_crl(data: bytes, trusted_pem: bytes, *, source: str) -> x509.CertificateRevocationList:
    """Load a PEM or DER CRL and check it is signed by one of the trusted certificates."""
    try:
        crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data
               else x509.load_der_x509_crl(data))
    except ValueError:
        raise ValueError(f"CRL from {source} is neither a PEM nor a DER CRL") from None
    issuers = [c for c in _load_certs(trusted_pem) if c.subject == crl.issuer]
    for issuer in issuers:
        key = issuer.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) and \
                crl.is_signature_valid(key):
            return crl
    raise ValueError(f"CRL from {source} is not signed by a trusted CA certificate")


def _load_certs(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem) if pem.strip() else []
    except ValueError:
        return []


async def refresh_crl(
    deny: DenyList, *, crl_file: str, crl_url: str, roots_pem: bytes, timeout_s: float = 10.0
) -> bool:
    """Load the configured CRL once; log and keep the old one on any failure."""
    source = redact_url(crl_url) if crl_url else crl_file
    try:
        if crl_url:
            data = await _fetch(crl_url, roots_pem, timeout_s)
        else:
            data = await asyncio.to_thread(Path(crl_file).read_bytes)
        count = deny.set_crl(data, source=source)
    except FileNotFoundError:
        log.warning("CRL file %s does not exist; the previous CRL stays in force", crl_file)
        return False
    except (OSError, httpx.HTTPError, TimeoutError, ValueError) as exc:
        log.warning("CRL not updated (%s); the previous CRL stays in force",
                    exc if isinstance(exc, ValueError) else f"{type(exc).__name__} "
                    f"from {source}")
        if deny.crl_in_force is not None and not deny.crl_fresh():
            # Still enforced (never un-revoke), but revocations since then are unknown.
            log.error("the CRL in force passed its next_update (%s) and no newer CRL could "
                      "be loaded from %s", deny.crl_in_force.next_update_utc, source)
        return False
    log.info("CRL from %s in force: %d revoked serials", source, count)
    return True


async def _fetch(url: str, roots_pem: bytes, timeout_s: float) -> bytes:
    # Plain http is acceptable: the CRL is signed and checked for freshness and order.
    # https verifies against our roots only.
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cadata=roots_pem.decode("ascii")) if roots_pem else True
    )
    # httpx's timeout applies per read; the overall deadline stops a slow drip.
    async with asyncio.timeout(timeout_s), httpx.AsyncClient(
            verify=verify, timeout=timeout_s, trust_env=False) as client, \
            client.stream("GET", url) as response:
        response.raise_for_status()
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_CRL_BYTES:
            raise ValueError(f"CRL from {redact_url(url)} is larger than {MAX_CRL_BYTES} bytes")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_CRL_BYTES:
                raise ValueError(
                    f"CRL from {redact_url(url)} is larger than {MAX_CRL_BYTES} bytes")
        return bytes(body)


async def crl_refresher(
    deny: DenyList, *, crl_file: str, crl_url: str, roots_pem: bytes, interval_s: float,
    timeout_s: float = 10.0,
) -> None:
    """Reload the CRL every `interval_s` seconds until cancelled (the first load is done)."""
    last_mtime = _mtime(crl_file) if crl_file and not crl_url else None
    while True:
        await asyncio.sleep(interval_s)
        if crl_file and not crl_url:
            mtime = _mtime(crl_file)
            if mtime == last_mtime:
                continue
            last_mtime = mtime
        await refresh_crl(deny, crl_file=crl_file, crl_url=crl_url, roots_pem=roots_pem,
                          timeout_s=timeout_s)


def _mtime(path: str) -> _Stamp | None:
    # Not the mtime alone: a replace within the timestamp granularity would go unseen.
    try:
        return _stamp(os.stat(path))
    except OSError:
        return None
