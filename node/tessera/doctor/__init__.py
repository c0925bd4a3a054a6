"""Health checks of the node's dependencies, with actionable, credential-free messages."""

from tessera.core.checks import Check, Level, worst
from tessera.doctor._checks import (
    CERT_WARN,
    Dependencies,
    check_certificate,
    check_dependencies,
    check_follow,
    check_peer_certificate,
    check_postgres,
    check_renewal,
    check_stepca,
    check_valkey,
    renewal_check_name,
)

__all__ = [
    "CERT_WARN",
    "Check",
    "Dependencies",
    "Level",
    "check_certificate",
    "check_dependencies",
    "check_follow",
    "check_peer_certificate",
    "check_postgres",
    "check_renewal",
    "check_stepca",
    "check_valkey",
    "renewal_check_name",
    "worst",
]
