"""The one place a node is built, run and stopped (the composition root), and the
supervisor that owns a data directory, its embedded services and its serving processes."""

from tessera.app._database import database, running_dsn
from tessera.app._lock import DataDirInUse, DataDirLock, holder_pid
from tessera.app._node import (
    SERVICE_NAMES,
    Node,
    prepare_data_dir,
    provision_dev_certificates,
    start_node,
)
from tessera.app._supervisor import read_status, serve

__all__ = [
    "SERVICE_NAMES",
    "DataDirInUse",
    "DataDirLock",
    "Node",
    "database",
    "holder_pid",
    "prepare_data_dir",
    "provision_dev_certificates",
    "read_status",
    "running_dsn",
    "serve",
    "start_node",
]
