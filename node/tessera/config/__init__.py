"""Configuration: TOML and `TESSERA_*` environment variables parsed into typed values.

Components depend on config, never the reverse.
"""

from tessera.config._config import (
    DEFAULT_DATA_DIR,
    METRICS,
    AuditConfig,
    CaConfig,
    Config,
    EnrolmentConfig,
    FederationConfig,
    GrpcConfig,
    MetricsConfig,
    NodeConfig,
    OperationsConfig,
    RateLimitConfig,
    StoreConfig,
    TlsConfig,
    ValkeyConfig,
    is_loopback,
    load,
    validate,
)
from tessera.config._limits import (
    ADMIN,
    COMMAND,
    EVENT,
    METHOD_CLASSES,
    READ,
    SEARCH,
    Limit,
    parse_limits,
)

__all__ = [
    "ADMIN",
    "COMMAND",
    "DEFAULT_DATA_DIR",
    "EVENT",
    "METHOD_CLASSES",
    "METRICS",
    "READ",
    "SEARCH",
    "AuditConfig",
    "CaConfig",
    "Config",
    "EnrolmentConfig",
    "FederationConfig",
    "GrpcConfig",
    "Limit",
    "MetricsConfig",
    "NodeConfig",
    "OperationsConfig",
    "RateLimitConfig",
    "StoreConfig",
    "TlsConfig",
    "ValkeyConfig",
    "is_loopback",
    "load",
    "parse_limits",
    "validate",
]
