"""Commands and their operations: the handler registry (built-ins and `tessera.commands`
entry-point plugins), and the runner that executes long-running handlers under leases."""

from tessera.commands._agents import KILL as AGENT_KILL
from tessera.commands._agents import SPAWN as AGENT_SPAWN
from tessera.commands._agents import STATUS as AGENT_STATUS
from tessera.commands._agents import (
    Agents,
    AgentSpec,
    UidClaims,
    UidRange,
    agent_identity,
    check_secrets_closed,
    kill_leftovers,
    parse_agents,
    parse_uid_range,
)
from tessera.commands._handler import (
    Admission,
    Admit,
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
    "AGENT_KILL",
    "AGENT_SPAWN",
    "AGENT_STATUS",
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Admission",
    "Admit",
    "AgentSpec",
    "Agents",
    "CancelHook",
    "CommandCancelled",
    "CommandContext",
    "CommandError",
    "CommandHandler",
    "Registered",
    "Registry",
    "Run",
    "Runner",
    "UidClaims",
    "UidRange",
    "agent_identity",
    "check_secrets_closed",
    "kill_leftovers",
    "parse_agents",
    "parse_uid_range",
]
