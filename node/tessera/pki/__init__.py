"""Certificates and identities: the development CA, step-ca, TLS credentials."""

from tessera.pki._csr import KeyAndCsr, new_key_and_csr
from tessera.pki._denylist import DenyList
from tessera.pki._devca import DevCA, local_sans, needs_reissue
from tessera.pki._enrol import Enrolment, credentials_valid, enrol
from tessera.pki._files import write_atomic, write_atomic_pair
from tessera.pki._identity import IdentityKind, PeerCertificate, SpiffeId, identity_from_pem
from tessera.pki._issuer import IssuedCertificate, Issuer
from tessera.pki._node import NodeCertificates, ensure_enrolled, make_stepca_issuer
from tessera.pki._nodename import derive_name, resolve_node_name
from tessera.pki._renewal import (
    CertificateStatus,
    CertState,
    ManagedCertificate,
    read_status,
    sans_of,
)
from tessera.pki._revocations import CHANNEL as REVOCATIONS_CHANNEL
from tessera.pki._revocations import record_revocation_at
from tessera.pki._tls import ReloadableServerCredentials, TlsMaterial, expired_placeholder
from tessera.pki.stepca import StepCAError, StepCAIssuer, init_stepca

__all__ = [
    "REVOCATIONS_CHANNEL",
    "CertState",
    "CertificateStatus",
    "DenyList",
    "DevCA",
    "Enrolment",
    "IdentityKind",
    "IssuedCertificate",
    "Issuer",
    "KeyAndCsr",
    "ManagedCertificate",
    "NodeCertificates",
    "PeerCertificate",
    "ReloadableServerCredentials",
    "SpiffeId",
    "StepCAError",
    "StepCAIssuer",
    "TlsMaterial",
    "credentials_valid",
    "derive_name",
    "enrol",
    "ensure_enrolled",
    "expired_placeholder",
    "identity_from_pem",
    "init_stepca",
    "local_sans",
    "make_stepca_issuer",
    "needs_reissue",
    "new_key_and_csr",
    "read_status",
    "record_revocation_at",
    "resolve_node_name",
    "sans_of",
    "write_atomic",
    "write_atomic_pair",
]
