"""Certificates and identities: the development CA, step-ca, TLS credentials."""

from tessera.pki._csr import KeyAndCsr, new_key_and_csr
from tessera.pki._denylist import DenyList
from tessera.pki._devca import CredentialFiles, DevCA, local_sans, needs_reissue
from tessera.pki._enrol import Enrolment, credentials_valid, enrol
from tessera.pki._files import write_atomic
from tessera.pki._identity import IdentityKind, PeerCertificate, SpiffeId, identity_from_pem
from tessera.pki._issuer import IssuedCertificate, Issuer
from tessera.pki._renewal import CertificateStatus, CertState, ManagedCertificate
from tessera.pki._stepca_issuer import StepCAIssuer
from tessera.pki._tls import ReloadableServerCredentials, TlsMaterial

__all__ = [
    "CertState",
    "CertificateStatus",
    "CredentialFiles",
    "DenyList",
    "DevCA",
    "Enrolment",
    "IdentityKind",
    "IssuedCertificate",
    "Issuer",
    "KeyAndCsr",
    "ManagedCertificate",
    "PeerCertificate",
    "ReloadableServerCredentials",
    "SpiffeId",
    "StepCAIssuer",
    "TlsMaterial",
    "credentials_valid",
    "enrol",
    "identity_from_pem",
    "local_sans",
    "needs_reissue",
    "new_key_and_csr",
    "write_atomic",
]
