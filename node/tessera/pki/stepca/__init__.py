"""step-ca: the HTTP client (sign, renew, revoke), the issuer built on it, and `ca init`."""

from tessera.pki.stepca._client import (
    StepCAClient,
    StepCAError,
    StepCARefused,
    StepCAUnauthorized,
    StepCAUnavailable,
    mint_ott,
    redact,
)
from tessera.pki.stepca._config import StepCAFiles, init_stepca, load_stepca_files
from tessera.pki.stepca._issuer import StepCAIssuer

__all__ = [
    "StepCAClient",
    "StepCAError",
    "StepCAFiles",
    "StepCAIssuer",
    "StepCARefused",
    "StepCAUnauthorized",
    "StepCAUnavailable",
    "init_stepca",
    "load_stepca_files",
    "mint_ott",
    "redact",
]
