"""`AdminService.Reload` and SIGHUP: re-read the configuration, apply what can change
without a restart, in every serving process of the node.

What a reload applies (`config.RELOADABLE_SECTIONS`): the `[ratelimit]` section (limits,
on/off, fallback mode, timeouts) and the `[log]` section (format, level, access lines).
It also re-reads the deny list, the configured CRL and the certificate files. Any other
changed setting is reported as not reloaded (it needs a restart of `tessera serve`).
A configuration that does not load is refused as a whole (FAILED_PRECONDITION naming the
setting) and nothing changes anywhere.

Across serving processes (`--workers N`): the process that takes the call validates,
sends the new settings on the node's reload channel (PostgreSQL NOTIFY, committed with
the call's audit record), applies them, and answers once every live serving process has
applied the same settings, or after `ANSWER_TIMEOUT_S` naming those that did not. SIGHUP
to the supervisor is forwarded to every serving process, each of which re-reads the file.
The settings applied are kept in `run/reload.json`, so a serving process restarted after
a crash starts with them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tessera import config
from tessera.core.errors import ConfigError, FailedPrecondition
from tessera.core.paths import CredentialFiles
from tessera.observability import configure_logging
from tessera.pki import NodeCertificates, ReloadableServerCredentials, write_atomic
from tessera.ratelimit import RateLimiter, RowBudgets
from tessera.store import Pool, ReloadChannel, effect_transaction

log = logging.getLogger(__name__)

#: Seconds the process that took a Reload waits for the other serving processes.
ANSWER_TIMEOUT_S = 10.0
#: The settings of the last reload, under the data directory's run/ (one node's life).
RELOADED_FILE = "reload.json"
_RESTART = "changed, but needs a restart of `tessera serve` to apply"


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, in this process and the node's others."""

    reloaded: list[str]
    not_reloaded: list[str]
    processes_applied: int = 1
    processes_missing: list[str] | None = None


def saved_settings(run_dir: Path) -> dict[str, str]:
    """The settings of this node's last reload (empty when there was none)."""
    try:
        data = json.loads((run_dir / RELOADED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in dict(data).items()} if isinstance(data, dict) else {}


class Reloader:
    """Reloads one serving process, and (through the channel) the node's others."""

    def __init__(self, *, applied: config.Config, source: config.ConfigSource | None,
                 limiter: RateLimiter, budgets: RowBudgets | None,
                 certificates: NodeCertificates, credentials: ReloadableServerCredentials,
                 server_files: CredentialFiles, default_log_level: str, run_dir: Path,
                 peers: Callable[[], list[int]] = list) -> None:
        #: The configuration as loaded (before the node name or ports were resolved),
        #: with the reloads applied since: what a new reading is compared with.
        self.applied = applied
        self.source = source
        self.limiter, self.budgets = limiter, budgets
        self.certificates, self.credentials = certificates, credentials
        self.server_files = server_files
        self.default_log_level = default_log_level
        self.run_dir = run_dir
        #: Pids of the node's live serving processes (this one included, or not).
        self.peers = peers
        self.channel: ReloadChannel | None = None
        self._lock = asyncio.Lock()

    # -- reading --------------------------------------------------------------------

    def _read(self) -> config.Config:
        if self.source is None:
            raise FailedPrecondition(
                "this node was started without a configuration source to read again; "
                "restart it to change its configuration", reason="NO_CONFIG_SOURCE")
        try:
            return self.source.load()
        except ConfigError as exc:
            raise FailedPrecondition(
                f"the configuration was not reloaded (nothing changed): {exc.message}",
                reason="CONFIG_INVALID") from None

    def _plan(self, new: config.Config) -> tuple[dict[str, str], list[str], list[str]]:
        """(the reloadable settings to apply, those that changed, "setting: why" of the
        changed ones that need a restart)."""
        changed = config.changed_settings(self.applied, new)
        reloadable = [k for k in changed if k.partition(".")[0] in config.RELOADABLE_SECTIONS]
        later = [f"{k}: {_RESTART}" for k in changed if k not in reloadable]
        settings = {k: v for k, v in config.flatten(new).items()
                    if k.partition(".")[0] in config.RELOADABLE_SECTIONS}
        return settings, reloadable, later

    # -- applying -------------------------------------------------------------------

    async def apply(self, settings: Mapping[str, str]) -> tuple[list[str], list[str]]:
        """Apply reloadable settings here; (what was re-read, "name: why" failures).
        Raises ConfigError (nothing changed) when they do not load."""
        async with self._lock:
            new = config.load(None, environ={},
                              overrides={**config.flatten(self.applied), **settings})
            self.limiter.reconfigure(new.ratelimit)
            if self.budgets is not None:
                self.budgets.timeout_s = new.ratelimit.decision_timeout_ms / 1000
                self.budgets.on_valkey_failure = new.ratelimit.on_valkey_failure
            configure_logging(new.log.format, new.log.level or self.default_log_level,
                              access=new.log.access)
            self.applied = new
            write_atomic(self.run_dir / RELOADED_FILE,
                         json.dumps(dict(settings), sort_keys=True).encode())
            return await self.certificates.reread(self.credentials, self.server_files)

    async def apply_request(self, settings: Mapping[str, str]) -> str:
        """Apply another process's reload; "" on success, else why not (for its answer)."""
        try:
            _, failed = await self.apply(settings)
        except ConfigError as exc:
            log.error("reload not applied: %s", exc.message)
            return exc.message
        log.info("reloaded the configuration (sent by another serving process)")
        return "; ".join(failed)

    async def reload_here(self) -> ReloadResult:
        """SIGHUP: read the configuration again and apply it in this process only (the
        supervisor signals every serving process)."""
        new = self._read()
        settings, changed, later = self._plan(new)
        done, failed = await self.apply(settings)
        return ReloadResult([*changed, *done], [*later, *failed])

    async def reload_node(self, pool: Pool) -> ReloadResult:
        """The RPC: validate, tell the other processes (committed with the call's audit
        record), apply here, wait for their answers."""
        new = self._read()
        settings, changed, later = self._plan(new)
        rid, payload = self.channel.request(settings) if self.channel else ("", "")
        try:
            async with effect_transaction(pool) as conn:
                if payload:
                    await ReloadChannel.send(conn, payload)
            done, failed = await self.apply(settings)
            missing: list[str] = []
            applied = 1
            if self.channel is not None:
                answers, silent = await self.channel.wait(rid, self.peers, ANSWER_TIMEOUT_S)
                rid = ""
                applied += sum(1 for error in answers.values() if not error)
                missing = [f"{pid}: {error}" for pid, error in sorted(answers.items()) if error]
                missing += [f"{pid}: did not confirm within {ANSWER_TIMEOUT_S:g} s"
                            for pid in silent]
        finally:
            if rid and self.channel is not None:
                self.channel.forget(rid)
        log.info("reloaded the configuration in %d serving process(es): %s", applied,
                 ", ".join([*changed, *done]) or "nothing changed")
        return ReloadResult([*changed, *done], [*later, *failed], applied, missing)
