"""`tessera reload`: the running node re-reads its configuration (AdminService.Reload).

Every serving process applies what can change without a restart; what needs a restart is
listed. (SIGHUP to `tessera serve` does the same, with the result in the node's log.)
"""

from __future__ import annotations

from tessera.cli._command import Command, Env
from tessera.cli._output import Printer
from tessera_client.pb import admin_pb2


def _reload(env: Env) -> int:
    with env.node().client() as c:
        resp = c.admin.Reload(admin_pb2.ReloadRequest(), timeout=60)
    env.out.result(resp, lambda: _print(env.out, resp))
    return 1 if resp.processes_missing else 0


def _print(out: Printer, resp: admin_pb2.ReloadResponse) -> None:
    out.line(f"reloaded in {resp.processes_applied} serving process(es): "
             f"{', '.join(resp.reloaded) or 'nothing'}")
    for item in resp.not_reloaded:
        out.warn(f"not reloaded: {item}")
    for item in resp.processes_missing:
        out.warn(f"serving process {item}")


RELOAD = Command("re-read the configuration file and apply what needs no restart "
                 "(rate limits, logging, deny list, CRL, certificate files)", _reload,
                 json=True, address=True)
