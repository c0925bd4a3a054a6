"""Write a complete, ready-to-run step-ca 0.19 configuration with `cryptography` alone.

`step ca init` (the `step` CLI) is not packaged in Debian, so the node makes the root,
the intermediate, the JWK provisioner and `ca.json` itself. The layout mirrors what
`step ca init` produces, so step-ca's own documentation applies:

    <dir>/certs/root_ca.crt              root certificate (public)
    <dir>/certs/intermediate_ca.crt      intermediate certificate (public)
    <dir>/secrets/root_ca_key            root key, encrypted PKCS#8 (0600; move it offline)
    <dir>/secrets/intermediate_ca_key    intermediate key, encrypted PKCS#8 (0600)
    <dir>/secrets/password               password of both keys (0600)
    <dir>/secrets/provisioner.jwk.json   the provisioner's private JWK (0600)
    <dir>/config/ca.json                 step-ca configuration
    <dir>/db/                            bbolt database (revocations, used tokens)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.core.codec import b64url_encode
from tessera.core.net import is_wildcard_host, split_host_port
from tessera.pki._files import write_atomic

__all__ = [
    "StepCAFiles",
    "init_stepca",
    "jwk_thumbprint",
    "load_stepca_files",
    "private_jwk_from_key",
    "public_jwk_from_key",
]

#: Root and intermediate lifetimes; leaves are short-lived and bounded by the claims.
_ROOT_LIFETIME = dt.timedelta(days=3650)
_INTERMEDIATE_LIFETIME = dt.timedelta(days=1825)
# Go's x509 rejects certificates whose NotBefore is in its future; a small backdate
# absorbs clock skew between the machine that ran init and the CA host.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class StepCAFiles:
    """Paths of a step-ca configuration written by `init_stepca`, plus what clients pin."""

    directory: Path
    """The configuration root."""
    ca_json: Path
    """step-ca's configuration file; pass it as the last argument of `step-ca`."""
    root_cert: Path
    """Root certificate, PEM."""
    intermediate_cert: Path
    """Intermediate certificate, PEM."""
    intermediate_key: Path
    """Intermediate key, encrypted PKCS#8 PEM (password in `password_file`)."""
    root_key: Path | None
    """Root key, encrypted PKCS#8 PEM, or None when it was not kept."""
    password_file: Path
    """Password of the encrypted keys; give it to `step-ca --password-file`."""
    provisioner_key: Path
    """The JWK provisioner's private JWK (JSON); used to mint one-time tokens."""
    db_path: Path
    """bbolt database file."""
    provisioner_name: str
    """Name of the JWK provisioner; the `iss` of every one-time token."""
    provisioner_kid: str
    """RFC 7638 thumbprint of the provisioner key; the `kid` header of every token."""
    root_fingerprint: str
    """SHA-256 of the root certificate's DER, lowercase hex; what clients pin."""
    address: str
    """`host:port` step-ca listens on."""
    ca_url: str
    """`https://host:port` for clients of this CA."""

    def step_ca_args(self) -> list[str]:
        """Arguments for the `step-ca` binary: flags first, then the config path."""
        return ["--password-file", str(self.password_file), str(self.ca_json)]


def init_stepca(
    directory: str | os.PathLike[str],
    *,
    address: str,
    provisioner_name: str = "tessera",
    default_cert_ttl: dt.timedelta = dt.timedelta(hours=24),
    min_cert_ttl: dt.timedelta = dt.timedelta(minutes=5),
    max_cert_ttl: dt.timedelta = dt.timedelta(hours=24),
    dns_names: Sequence[str] | None = None,
    ca_name: str = "Tessera",
    keep_root_key: bool = True,
    overwrite: bool = False,
) -> StepCAFiles:
    """Write root, intermediate, provisioner and `ca.json` for step-ca into `directory`."""
    host, _ = split_host_port(address, min_port=1)
    _check_durations(min_cert_ttl, default_cert_ttl, max_cert_ttl)
    if not provisioner_name.strip():
        raise ValueError("provisioner_name must not be empty")
    names = list(dns_names) if dns_names is not None else _default_dns_names(host)
    if not names:
        raise ValueError("dns_names must name at least one host clients use to reach the CA")

    root = Path(directory).resolve()
    layout = _layout(root)
    if layout["ca_json"].exists() and not overwrite:
        raise FileExistsError(
            f"{layout['ca_json']} already exists; pass overwrite=True to replace this CA"
        )
    for sub in ("certs", "secrets", "config", "db"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Only the owner may list the secrets; the files inside are 0600 as well.
    os.chmod(root / "secrets", 0o700)
    os.chmod(root / "db", 0o700)

    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_cert = _make_root(root_key, f"{ca_name} Root CA", now)
    int_key = ec.generate_private_key(ec.SECP256R1())
    int_cert = _make_intermediate(int_key, root_key, root_cert, f"{ca_name} Intermediate CA", now)
    prov_key = ec.generate_private_key(ec.SECP256R1())
    public_jwk = public_jwk_from_key(prov_key.public_key())
    kid = public_jwk["kid"]

    password = secrets.token_urlsafe(32).encode("ascii")
    encryption = serialization.BestAvailableEncryption(password)
    # Secrets first and ca.json last: a ca.json on disk means the set is complete.
    write_atomic(layout["password"], password, private=True)
    write_atomic(
        layout["intermediate_key"],
        int_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ),
        private=True,
    )
    if keep_root_key:
        write_atomic(
            layout["root_key"],
            root_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            ),
            private=True,
        )
    else:
        layout["root_key"].unlink(missing_ok=True)
    write_atomic(
        layout["provisioner_key"],
        (json.dumps(private_jwk_from_key(prov_key), indent=2) + "\n").encode(),
        private=True,
    )
    write_atomic(layout["root_cert"], root_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(layout["intermediate_cert"], int_cert.public_bytes(serialization.Encoding.PEM))

    provisioner: dict[str, Any] = {
        "type": "JWK",
        "name": provisioner_name,
        "key": public_jwk,
        "claims": {
            "minTLSCertDuration": _go_duration(min_cert_ttl),
            "maxTLSCertDuration": _go_duration(max_cert_ttl),
            "defaultTLSCertDuration": _go_duration(default_cert_ttl),
            # Nodes renew over mTLS at ~2/3 of the lifetime; renewal must stay on.
            "disableRenewal": False,
        },
    }
    config: dict[str, Any] = {
        "root": str(layout["root_cert"]),
        "federatedRoots": None,
        "crt": str(layout["intermediate_cert"]),
        "key": str(layout["intermediate_key"]),
        "address": address,
        "dnsNames": names,
        "commonName": f"{ca_name} Online CA",
        "logger": {"format": "text"},
        # bbolt persists revocations and used token ids: without a db step-ca accepts a
        # token twice and cannot refuse a revoked certificate's renewal.
        "db": {"type": "bbolt", "dataSource": str(layout["db"])},
        "authority": {"provisioners": [provisioner]},
        "tls": {"minVersion": 1.2, "maxVersion": 1.3},
    }
    # 0600 like step ca init does: it names the paths of the CA's key material.
    write_atomic(layout["ca_json"], (json.dumps(config, indent=2) + "\n").encode(), private=True)
    return _files(root, layout, keep_root_key=keep_root_key,
                  provisioner_name=provisioner_name, provisioner_kid=kid,
                  root_cert=root_cert, address=address)


def load_stepca_files(directory: str | os.PathLike[str]) -> StepCAFiles:
    """Describe a configuration that `init_stepca` wrote earlier into `directory`."""
    root = Path(directory).resolve()
    layout = _layout(root)
    try:
        config = json.loads(layout["ca_json"].read_text(encoding="utf-8"))
        provisioner = next(p for p in config["authority"]["provisioners"] if p.get("type") == "JWK")
        address = str(config["address"])
        root_cert = x509.load_pem_x509_certificate(layout["root_cert"].read_bytes())
    except FileNotFoundError:
        raise
    except (KeyError, StopIteration, TypeError, ValueError) as exc:
        raise ValueError(
            f"{layout['ca_json']} is not a step-ca configuration written by init_stepca "
            f"({type(exc).__name__})"
        ) from None
    return _files(root, layout, keep_root_key=layout["root_key"].exists(),
                  provisioner_name=str(provisioner["name"]),
                  provisioner_kid=str(provisioner["key"]["kid"]), root_cert=root_cert,
                  address=address)


def _files(root: Path, layout: dict[str, Path], *, keep_root_key: bool,
           provisioner_name: str, provisioner_kid: str, root_cert: x509.Certificate,
           address: str) -> StepCAFiles:
    host, port = split_host_port(address, min_port=1)
    return StepCAFiles(
        directory=root,
        ca_json=layout["ca_json"],
        root_cert=layout["root_cert"],
        intermediate_cert=layout["intermediate_cert"],
        intermediate_key=layout["intermediate_key"],
        root_key=layout["root_key"] if keep_root_key else None,
        password_file=layout["password"],
        provisioner_key=layout["provisioner_key"],
        db_path=layout["db"],
        provisioner_name=provisioner_name,
        provisioner_kid=provisioner_kid,
        root_fingerprint=_fingerprint(root_cert),
        address=address,
        ca_url=_ca_url(host, port),
    )


def public_jwk_from_key(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a P-256 key, with `kid` set to its RFC 7638 thumbprint."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only P-256 provisioner keys are supported")
    numbers = key.public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }
    return {"use": "sig", "alg": "ES256", "kid": jwk_thumbprint(jwk), **jwk}


def private_jwk_from_key(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The private JWK (public members plus `d`) of a P-256 key."""
    jwk = public_jwk_from_key(key.public_key())
    jwk["d"] = b64url_encode(key.private_numbers().private_value.to_bytes(32, "big"))
    return jwk


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of an EC JWK, base64url without padding."""
    # RFC 7638 §3.2: only the required members, sorted, no whitespace.
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def _layout(root: Path) -> dict[str, Path]:
    return {
        "root_cert": root / "certs" / "root_ca.crt",
        "intermediate_cert": root / "certs" / "intermediate_ca.crt",
        "root_key": root / "secrets" / "root_ca_key",
        "intermediate_key": root / "secrets" / "intermediate_ca_key",
        "password": root / "secrets" / "password",
        "provisioner_key": root / "secrets" / "provisioner.jwk.json",
        "ca_json": root / "config" / "ca.json",
        "db": root / "db" / "ca.db",
    }


def _make_root(key: ec.EllipticCurvePrivateKey, cn: str, now: dt.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_intermediate(
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    cn: str,
    now: dt.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _INTERMEDIATE_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _default_dns_names(host: str) -> list[str]:
    # step-ca puts these in its own TLS certificate and accepts tokens whose audience
    # names any of them, so list every name clients may use for a local CA.
    names = ["localhost", "127.0.0.1", "::1"]
    if not is_wildcard_host(host) and host not in names:
        names.insert(0, host)
    return names


def _ca_url(host: str, port: int) -> str:
    if is_wildcard_host(host):
        host = "127.0.0.1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"https://{host}:{port}"


def _check_durations(
    min_ttl: dt.timedelta, default_ttl: dt.timedelta, max_ttl: dt.timedelta
) -> None:
    # step-ca refuses to start on these too, but with a less direct message.
    if min(min_ttl, default_ttl, max_ttl) <= dt.timedelta(0):
        raise ValueError("certificate durations must be positive")
    if not min_ttl <= default_ttl <= max_ttl:
        raise ValueError(
            "certificate durations must satisfy min_cert_ttl <= default_cert_ttl <= max_cert_ttl"
        )


def _go_duration(value: dt.timedelta) -> str:
    """A Go `time.ParseDuration` string for `value`, at millisecond precision."""
    millis = round(value.total_seconds() * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


