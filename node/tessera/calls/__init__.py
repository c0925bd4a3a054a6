"""Who is calling: the authenticated `Caller`, who may reach which method, and admission.

Sits above `grants` and `pki`: a caller carries its verified identity and, for a peer,
the grant and scope admission looked up for this call.
"""

from tessera.calls._admission import PEER_METHODS, GrantAdmission, peer_scope
from tessera.calls._caller import (
    ADMIN_SERVICE,
    OPEN_SERVICES,
    Access,
    Admission,
    Auditor,
    Caller,
    CallOutcome,
    KindAdmission,
    Limiter,
    authenticate,
    authorize,
    bind_caller,
    caller_or_none,
    current_caller,
    required_access,
    split_method,
)

# The current call's pending audit record lives with the store's effect transactions.
from tessera.store import audit_intent, bind_audit_intent

__all__ = [
    "ADMIN_SERVICE",
    "OPEN_SERVICES",
    "PEER_METHODS",
    "Access",
    "Admission",
    "Auditor",
    "CallOutcome",
    "Caller",
    "GrantAdmission",
    "KindAdmission",
    "Limiter",
    "audit_intent",
    "authenticate",
    "authorize",
    "bind_audit_intent",
    "bind_caller",
    "caller_or_none",
    "current_caller",
    "peer_scope",
    "required_access",
    "split_method",
]
