"""The audit log: one hash-chained row per call, durable before the call is answered.

`AuditWriter` is the call path's `Auditor`; `_chain` holds the pure record encoding and
chain checks; `_store` the tables; `_prune` export and retention.
"""

from tessera.audit._chain import (
    GENESIS,
    AuditEntry,
    AuditRow,
    ChainVerifier,
    Outcome,
    Verdict,
    canonical,
    chain_hash,
    extend,
    kind_of,
    outcome_of,
    payload,
    prune_entry,
    query_hash,
    verify,
)
from tessera.audit._prune import PruneResult, prune
from tessera.audit._store import AuditFilter, count_rows, list_rows, verify_log
from tessera.audit._writer import AuditWriter, entry_of

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditFilter",
    "AuditRow",
    "AuditWriter",
    "ChainVerifier",
    "Outcome",
    "PruneResult",
    "Verdict",
    "canonical",
    "chain_hash",
    "count_rows",
    "entry_of",
    "extend",
    "kind_of",
    "list_rows",
    "outcome_of",
    "payload",
    "prune",
    "prune_entry",
    "query_hash",
    "verify",
    "verify_log",
]
