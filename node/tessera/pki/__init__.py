"""Certificates and identities: the development CA, step-ca, TLS credentials."""

from tessera.pki._csr import KeyAndCsr, new_key_and_csr
from tessera.pki._devca import CredentialFiles, DevCA, local_sans, needs_reissue
from tessera.pki._files import write_atomic
from tessera.pki._identity import IdentityKind, PeerCertificate, SpiffeId, identity_from_pem
from tessera.pki._issuer import IssuedCertificate, Issuer
from tessera.pki._tls import ReloadableServerCredentials, TlsMaterial

__all__ = [
    "CredentialFiles",
    "DevCA",
    "IdentityKind",
    "IssuedCertificate",
    "Issuer",
    "KeyAndCsr",
    "PeerCertificate",
    "ReloadableServerCredentials",
    "SpiffeId",
    "TlsMaterial",
    "identity_from_pem",
    "local_sans",
    "needs_reissue",
    "new_key_and_csr",
    "write_atomic",
]
