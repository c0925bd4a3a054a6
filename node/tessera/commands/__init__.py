"""Commands and their operations: the handler registry (built-ins and `tessera.commands`
entry-point plugins), and the runner that executes long-running handlers under leases."""

from tessera.commands._handler import (
    CancelHook,
    CommandCancelled,
    CommandContext,
    CommandError,
    CommandHandler,
    Run,
)
from tessera.commands._registry import BUILTINS, ENTRY_POINT_GROUP, Registered, Registry
from tessera.commands._runner import Runner

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "CancelHook",
    "CommandCancelled",
    "CommandContext",
    "CommandError",
    "CommandHandler",
    "Registered",
    "Registry",
    "Run",
    "Runner",
]
