"""Wiring peering and grants into a running node."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc

from tessera.grants import GrantStore
from tessera.peering._listener import start_enroll_listener
from tessera.peering._service import Peering, token_key
from tessera.pki import Issuer
from tessera.runtime import Runtime
from tessera_client.pb import resources_pb2

_UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "[::]", "")  # noqa: S104 - matching, not binding


def dialable(address: str) -> str:
    """host:port others can dial for a bound address (wildcard hosts become loopback)."""
    host, _, port = address.rpartition(":")
    return f"{'127.0.0.1' if host in _UNSPECIFIED_HOSTS else host}:{port}"


def grant_store_of(rt: Runtime) -> GrantStore:
    """The node's grant store (created by `attach`)."""
    store: GrantStore = rt.extras["grants"]
    return store


def peering_of(rt: Runtime) -> Peering:
    """The node's peering service (created by `attach`)."""
    service: Peering = rt.extras["peering"]
    return service


def _issuer(rt: Runtime) -> Issuer | None:
    # The certificate work keeps the issuer on rt.certificates; fall back to extras so this
    # stays independent of how that lands.
    certs: Any = getattr(rt, "certificates", None)
    if certs is not None:
        issuer: Issuer | None = certs.issuer
        return issuer
    found: Issuer | None = rt.extras.get("issuer")
    return found


def _deny(rt: Runtime, serial: int) -> None:
    certs: Any = getattr(rt, "certificates", None)
    deny_list = getattr(certs, "deny_list", None)
    if deny_list is not None:
        deny_list.add([serial])


def attach(rt: Runtime) -> GrantStore:
    """Create the grant store and peering service of a node; returns the grant store."""
    grants = GrantStore(rt.pool)
    rt.extras["grants"] = grants
    issuer = _issuer(rt)
    rt.extras["peering"] = Peering(
        grants=grants, node=rt.identity, key=token_key(rt.tokens.secret),
        roots_pem=lambda: rt.credentials.material.roots_pem,
        issuer=lambda: _issuer(rt),
        deny=lambda serial: _deny(rt, serial),
        address=lambda: rt.cfg.node.advertised_address or dialable(rt.listen_address),
        enroll_address=lambda: str(rt.extras.get("enroll_address", "")),
        # The development CA has no renewal for peers yet, so it signs for as long as it
        # signs the node's own certificates; step-ca applies its own (short) default.
        peer_cert_ttl=(timedelta(hours=rt.cfg.tls.dev_cert_ttl_h)
                       if issuer is not None and issuer.kind == "dev-ca" else None),
    )
    return grants


async def start_enrolment(rt: Runtime) -> grpc.aio.Server:
    """Start the enrolment listener and record its dialable address in rt.extras."""
    cfg = rt.cfg.node
    address = cfg.enroll_listen_address or f"{cfg.listen_address.rpartition(':')[0]}:0"
    node = resources_pb2.Identity(
        uri=rt.identity.uri, trust_domain=rt.identity.trust_domain,
        kind=resources_pb2.Identity.KIND_NODE, name=rt.identity.name)
    server, port = await start_enroll_listener(address, peering_of(rt), node, rt.credentials,
                                               auditor=rt.extras.get("auditor"))
    rt.extras["enroll_address"] = dialable(f"{address.rpartition(':')[0]}:{port}")
    rt.extras["enroll_server"] = server
    return server
