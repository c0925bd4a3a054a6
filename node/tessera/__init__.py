"""Tessera: a gRPC federation node daemon."""

import os as _os

# The node forks helpers (pg_ctl, valkey-server) but never uses gRPC in a child, so gRPC's
# fork handlers are not needed; left on, they log a warning line at every fork.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
