"""What a CLI command is (`Command`) and what it runs with (`Env`).

Every command registers the same way: an entry `"noun verb": Command(...)` in the table
in `tessera/cli/__init__.py`. Its `run(env)` gets the parsed arguments, the configuration
(loaded on first use), the one printer and the one factory for clients of the local node.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tessera import config
from tessera.cli._client import LocalNode, Who, local_node
from tessera.cli._output import Printer


def _no_flags(p: argparse.ArgumentParser) -> None:
    """A command without options of its own."""


@dataclass(frozen=True)
class Command:
    """One `tessera <noun> <verb>` (or `tessera <name>`): its help, flags and handler."""

    help: str
    run: Callable[[Env], int]
    #: Adds the command's own arguments and options.
    flags: Callable[[argparse.ArgumentParser], None] = field(default=_no_flags)
    #: --data-dir: the command reads the configuration of a data directory.
    data_dir: bool = True
    #: --json: machine-readable output (Env.out.json is True).
    json: bool = False
    #: --address: call the node at this host:port instead of the one node.json names.
    address: bool = False
    #: The --json help text, when "machine-readable output" says too little.
    json_help: str = "machine-readable output"


class Env:
    """What a command runs with: arguments, configuration, printer, local-node factory."""

    def __init__(self, args: argparse.Namespace, printer: Printer | None = None) -> None:
        self.args = args
        self.out = printer or Printer(json_output=bool(getattr(args, "json", False)))

    @cached_property
    def cfg(self) -> config.Config:
        """The configuration: file, environment, then command-line overrides."""
        return config.load(self.args.config, overrides=self._overrides())

    def _overrides(self) -> dict[str, Any]:
        return {
            "node.data_dir": getattr(self.args, "data_dir", None),
            "node.listen_address": getattr(self.args, "listen", None),
            "node.workers": getattr(self.args, "workers", None),
            "log.format": getattr(self.args, "log_format", None),
        }

    def config_source(self) -> config.ConfigSource:
        """Where `cfg` comes from, for a node that reads it again on reload: the file,
        the TESSERA_* environment and these command-line overrides."""
        environ = {k: v for k, v in os.environ.items() if k.startswith("TESSERA_")}
        path = self.args.config or environ.pop("TESSERA_CONFIG", None)
        overrides = {k: str(v) for k, v in self._overrides().items() if v is not None}
        return config.ConfigSource(str(Path(path).resolve()) if path else None, environ,
                                   overrides)

    @property
    def data_dir(self) -> Path:
        """The data directory the configuration names."""
        return self.cfg.node.data_dir

    def node(self, who: Who = "admin") -> LocalNode:
        """The running local node, called as its local admin (or client): raises
        Unavailable with the fix when it is not running. Honours --address."""
        return local_node(self.data_dir, who, address=getattr(self.args, "node_address", None))
