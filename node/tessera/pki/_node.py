"""The node's certificates as one object: issuer, enrolment, renewal tasks, deny list.

`start_node` makes a `NodeCertificates`, the interceptor checks every call against its
`deny_list`, and the AdminService reads `server_status()` and calls `rotate()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from psycopg_pool import AsyncConnectionPool

from tessera.config import Config
from tessera.core.errors import ConfigError
from tessera.core.net import host_of
from tessera.core.paths import CredentialFiles, NodePaths
from tessera.core.redact import redact_url
from tessera.observability import Metrics
from tessera.pki._denylist import DenyList, crl_refresher, refresh_crl
from tessera.pki._devca import local_sans
from tessera.pki._enrol import Enrolment, credentials_valid, enrol
from tessera.pki._identity import IdentityKind, SpiffeId
from tessera.pki._issuer import Issuer
from tessera.pki._nodename import resolve_node_name
from tessera.pki._renewal import CertificateStatus, ManagedCertificate
from tessera.pki._revocations import SharedRevocations
from tessera.pki._tls import ReloadableServerCredentials, TlsMaterial
from tessera.pki.stepca._client import StepCAError
from tessera.pki.stepca._issuer import StepCAIssuer

log = logging.getLogger(__name__)

#: Seconds between fetches of the CA's root (pinned by fingerprint).
ROOT_REFRESH_S = 3600.0
#: Seconds between looks for the node's own serials on its deny list (a file read only
#: when it changed).
OWN_REVOCATION_CHECK_S = 0.5


def node_enrolment(cfg: Config) -> Enrolment:
    """The node's own identity with the DNS and IP SANs of its listen address."""
    cfg = resolve_node_name(cfg)  # `certs enroll` may run before the first `serve`
    dns, ips = local_sans(host_of(cfg.node.listen_address), cfg.node.name)
    if cfg.node.advertised_address:
        adv_dns, adv_ips = local_sans(host_of(cfg.node.advertised_address), cfg.node.name)
        dns, ips = tuple(sorted({*dns, *adv_dns})), tuple(sorted({*ips, *adv_ips}))
    return Enrolment(SpiffeId(cfg.node.trust_domain, IdentityKind.NODE, cfg.node.name), dns, ips)


def local_enrolments(cfg: Config) -> dict[str, Enrolment]:
    """The local admin and client identities (the same the development CA issues)."""
    td = cfg.node.trust_domain
    return {
        "admin": Enrolment(SpiffeId(td, IdentityKind.ADMIN, "admin")),
        "client": Enrolment(SpiffeId(td, IdentityKind.CLIENT, "local")),
    }


async def make_stepca_issuer(cfg: Config) -> StepCAIssuer:
    """A StepCAIssuer from the [ca] section."""
    c = cfg.ca
    return await StepCAIssuer.from_config(
        url=c.url, root_file=c.root_file, root_fingerprint=c.root_fingerprint,
        provisioner_name=c.provisioner_name, provisioner_key_file=c.provisioner_key_file,
        provisioner_password_file=c.provisioner_password_file,
        bootstrap_token_file=c.bootstrap_token_file, timeout_s=c.timeout_s,
        cached_root_file=cfg.node.data_dir / "pki" / "ca.crt",
    )


async def ensure_enrolled(cfg: Config, files: NodePaths, issuer: StepCAIssuer) -> list[str]:
    """Enrol the node (and, with a provisioner key, the local admin and client) unless
    their certificates are valid already; return the names that were enrolled."""
    roots = issuer.roots_pem()
    done: list[str] = []
    if not credentials_valid(files.server, roots):
        claims = issuer.bootstrap_claims()
        # StepCAUnavailable (retry later) and StepCARefused (a used or bad token) keep
        # their class: the CLI prints either as one line, and only a refusal is final.
        await enrol(issuer, files.server, node_enrolment(cfg),
                    sans=claims.sans if claims is not None else None)
        done.append("node")
    if issuer.has_provisioner:
        for name, enrolment in local_enrolments(cfg).items():
            target = files.admin if name == "admin" else files.client
            if not credentials_valid(target, roots):
                await enrol(issuer, target, enrolment)
                done.append(name)
    return done


def _uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs (the SPIFFE identity) of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted(san.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass
class NodeCertificates:
    """Everything the node does with certificates while it runs."""

    files: NodePaths
    issuer: Issuer | None
    deny_list: DenyList
    cfg: Config
    managed: dict[str, ManagedCertificate] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _crl_loaded: bool = field(default=False, init=False)
    shared: SharedRevocations | None = None

    @property
    def issuer_kind(self) -> str:
        """'dev-ca', 'step-ca' or 'external'."""
        return self.issuer.kind if self.issuer is not None else "external"

    @classmethod
    def create(cls, cfg: Config, files: NodePaths, issuer: Issuer | None,
               server_files: CredentialFiles) -> NodeCertificates:
        """Set up the deny list (trusting the served chain's CAs for CRLs)."""
        trusted = server_files.ca.read_bytes()
        with contextlib.suppress(OSError, ValueError):
            chain = x509.load_pem_x509_certificates(server_files.cert.read_bytes())
            trusted += b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:])
        # The stored CRL only counts while a CRL is configured: removing the setting is
        # how an operator stops enforcing one.
        store = files.crl if cfg.ca.crl_file or cfg.ca.crl_url else None
        return cls(files, issuer, DenyList(files.deny_list, trusted_pem=trusted,
                                           crl_store=store), cfg)

    async def load_crl(self, roots_pem: bytes) -> None:
        """Load the configured CRL once; raise ConfigError when none is in force.

        A node with a CRL configured must never serve without one: that would silently
        un-revoke every serial on it. The stored CRL (data_dir/pki/crl.der) counts when
        the source is down, as long as it has not passed its next_update.
        """
        c = self.cfg.ca
        self._crl_loaded = True
        if not (c.crl_file or c.crl_url):
            return
        await refresh_crl(self.deny_list, crl_file=c.crl_file, crl_url=c.crl_url,
                          roots_pem=roots_pem, timeout_s=c.timeout_s)
        if self.deny_list.crl_fresh():
            return
        setting, source = (("ca.crl_url", redact_url(c.crl_url)) if c.crl_url
                           else ("ca.crl_file", c.crl_file))
        what = ("the stored CRL passed its next_update"
                if self.deny_list.crl_in_force is not None else "no CRL is stored")
        raise ConfigError(
            f"{setting}: no valid CRL could be loaded from {source} and {what} in "
            f"{self.files.crl}; refusing to start without the CRL (fix the CRL source, "
            f"or remove {setting} to stop enforcing it)")

    async def start(self, credentials: ReloadableServerCredentials, metrics: Metrics) -> None:
        """Load the CRL, then start renewal (when there is an issuer) and refresh tasks."""
        c = self.cfg.ca
        metrics.denied_serials.labels("deny_list").set_function(
            lambda: len(self.deny_list.listed))
        metrics.denied_serials.labels("crl").set_function(
            lambda: len(self.deny_list.crl_serials))
        metrics.denied_serials.labels("shared").set_function(
            lambda: len(self.deny_list.shared))
        if not self._crl_loaded:
            await self.load_crl(credentials.material.roots_pem)
        if c.crl_file or c.crl_url:
            if c.crl_refresh_s > 0:
                self._spawn(crl_refresher(
                    self.deny_list, crl_file=c.crl_file, crl_url=c.crl_url,
                    roots_pem=credentials.material.roots_pem, interval_s=c.crl_refresh_s,
                    timeout_s=c.timeout_s))
        if self.issuer is None:
            return

        def served(material: TlsMaterial) -> None:
            credentials.swap(material)
            metrics.cert_expiry.set(material.leaf().not_valid_after_utc.timestamp())

        can_reenrol = not isinstance(self.issuer, StepCAIssuer) or self.issuer.has_provisioner
        wanted: dict[str, tuple[CredentialFiles, Callable[[TlsMaterial], None] | None]] = {
            "node": (self.files.server, served)}
        for name, target in (("admin", self.files.admin), ("client", self.files.client)):
            if target.cert.exists() and target.key.exists():
                wanted[name] = (target, None)
        decommissioned = DenyList(self.files.decommissioned)
        for name, (target, callback) in wanted.items():
            self.managed[name] = ManagedCertificate(
                name, target, self.issuer, renew_fraction=self.cfg.ca.renew_fraction,
                metrics=metrics, on_renewed=callback, can_reenrol=can_reenrol,
                decommissioned=decommissioned.__contains__,
            )
            self._spawn(self.managed[name].run())
        self._spawn(self._heal_own_revocations())
        if isinstance(self.issuer, StepCAIssuer):
            self._spawn(self._refresh_roots(self.issuer))

    async def share_revocations(self, pool: AsyncConnectionPool[Any], dsn: str) -> None:
        """Keep the deny list in step with the deployment's revoked_certificates table,
        so a serial revoked through one replica is refused by all of them."""
        self.shared = SharedRevocations(self.deny_list, pool, dsn)
        self.deny_list.on_add = self.shared.wake
        self.tasks.extend(await self.shared.start())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.create_task(coro))

    async def _heal_own_revocations(self) -> None:
        """Adopt certificates another serving process renewed; re-enrol any of the node's
        own certificates as soon as its serial is denied (`tessera certs revoke`, a CRL,
        another replica), unless decommissioned."""
        while True:
            for managed in self.managed.values():
                # Another serving process of the node may have renewed the files.
                managed.adopt_from_disk()
                serial = managed.serial
                if serial in self.deny_list:
                    managed.mark_revoked(serial)
            await asyncio.sleep(OWN_REVOCATION_CHECK_S)

    async def reread(self, credentials: ReloadableServerCredentials,
                     server_files: CredentialFiles) -> tuple[list[str], list[str]]:
        """A reload: read the deny list, the configured CRL and the certificate files
        again now. (what was re-read, what could not be: "name: why")."""
        done, failed = ["deny_list"], []
        self.deny_list.reload()
        c = self.cfg.ca
        if c.crl_file or c.crl_url:
            if await refresh_crl(self.deny_list, crl_file=c.crl_file, crl_url=c.crl_url,
                                 roots_pem=credentials.material.roots_pem,
                                 timeout_s=c.timeout_s):
                done.append("crl")
            else:
                failed.append("crl: the CRL could not be loaded; the previous one stays in "
                              "force (see the node's log)")
        if self.managed:  # renewed files (by another process or by hand) are adopted
            for managed in self.managed.values():
                managed.adopt_from_disk()
            done.append("certificate_files")
            return done, failed
        try:
            material = await asyncio.to_thread(
                TlsMaterial.read, server_files.cert, server_files.key, server_files.ca)
            leaf = material.leaf()
            key = serialization.load_pem_private_key(material.key_pem, None)
            if key.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo) != leaf.public_key(
                    ).public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo):
                raise ValueError("the key does not match the certificate")
            if _uris(leaf) != _uris(credentials.material.leaf()):
                raise ValueError("the certificate names another identity; the node's "
                                 "identity changes only with a restart")
        except (OSError, ValueError, TypeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            failed.append(f"certificate_files: {server_files.cert} not re-read ({why}); "
                          "the served certificate is unchanged")
            return done, failed
        if material != credentials.material:
            credentials.swap(material)
        done.append("certificate_files")
        return done, failed

    def statuses(self) -> dict[str, CertificateStatus]:
        """Status of every managed certificate (node, admin, client)."""
        return {name: m.status() for name, m in self.managed.items()}

    async def _refresh_roots(self, issuer: StepCAIssuer) -> None:
        while True:
            await asyncio.sleep(ROOT_REFRESH_S)
            try:
                if await issuer.refresh_roots():
                    log.warning("step-ca's root changed (same pinned fingerprint); "
                                "it is used from the next renewal on")
            except StepCAError as exc:
                log.warning("could not refresh step-ca's root (%s)", exc.message)

    def server_status(self) -> CertificateStatus | None:
        """Status of the node's serving certificate (None when its files are external)."""
        m = self.managed.get("node")
        return m.status() if m is not None else None

    async def rotate(self) -> CertificateStatus | None:
        """Renew the serving certificate now."""
        m = self.managed.get("node")
        if m is None:
            return None
        return await m.renew_now()

    async def stop(self) -> None:
        """Cancel the background tasks and close the issuer's connections."""
        self.deny_list.on_add = None
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        if isinstance(self.issuer, StepCAIssuer):
            await self.issuer.aclose()
