"""The Grafana dashboard and the Prometheus alert rules use only metrics a node exports.

Both files are loaded, every metric name their PromQL selects is extracted, and each must
be in the /metrics of a running `tessera serve`. The rules must pass `promtool check
rules` (installed by scripts/bootstrap.sh from the distribution's prometheus package);
where promtool is missing they must pass the schema check below, which always runs too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures.nodes import NodeFactory
from tests.fixtures.valkey import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "tessera-node.json"
ALERTS = REPO / "deploy" / "prometheus" / "tessera-alerts.yml"
#: The alerts the operations guide promises (docs/operations.md).
REQUIRED_ALERTS = {
    "TesseraCertificateExpiringSoon", "TesseraCertificateRenewalFailing", "TesseraAuditLagHigh",
    "TesseraPeerOffline", "TesseraRateLimitFallbackActive", "TesseraHighErrorRatio",
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum",
                                                              "_created"),
             "summary": ("_count", "_sum", "_created"), "gauge": ("",), "untyped": ("",),
             "info": ("_info",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "",
                  text)
    names = set()
    for m in re.finditer(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", text):
        if m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_metric_names_are_extracted_as_promql_reads_them() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, grpc_method) (rate('
            'grpc_server_handling_seconds_bucket{grpc_code=~"Internal|x"}[5m]))) > 0.5 '
            'and on (instance) tessera_audit_queue_rows > bool 3 unless time() - up offset 5m')
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket",
                                  "tessera_audit_queue_rows", "up"}


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics text can hold, from its TYPE lines."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base + suffix for suffix in _SUFFIXES.get(kind, ("",))}
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel (rows included) and template variable."""
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
        if m:
            exprs.append(m.group(1))
    return exprs


def check_rules_schema(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """The structure Prometheus requires of a rule file; returns the alerting rules."""
    assert set(rules) == {"groups"}, rules.keys()
    alerts = []
    seen_groups = set()
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        assert group["name"] not in seen_groups
        seen_groups.add(group["name"])
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "keep_firing_for",
                                 "labels", "annotations"}, rule.keys()
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule.get("alert", "x"))
            if "for" in rule:
                assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["for"]
            assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule
            assert rule.get("annotations", {}).get("summary"), rule
            # Balanced brackets: the commonest slip in a hand-written expression.
            for opening, closing in ("()", "[]", "{}"):
                assert rule["expr"].count(opening) == rule["expr"].count(closing), rule["expr"]
            alerts.append(rule)
    return alerts


def test_dashboard_and_alerts_use_only_metrics_a_running_node_exports(
    node_factory: NodeFactory
) -> None:
    mport = free_port()
    node_factory(name="metrics", env={"TESSERA_METRICS_LISTEN_ADDRESS": f"127.0.0.1:{mport}"})
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
        exported = exported_names(resp.read().decode())
    assert "grpc_server_handled_total" in exported and "tessera_audit_lag_seconds_bucket" in \
        exported

    rules = yaml.safe_load(ALERTS.read_text())
    alerts = check_rules_schema(rules)
    assert REQUIRED_ALERTS <= {a["alert"] for a in alerts}
    dashboard = json.loads(DASHBOARD.read_text())
    used: dict[str, set[str]] = {}
    for where, exprs in (("alerts", [a["expr"] for a in alerts]),
                         ("dashboard", dashboard_exprs(dashboard))):
        assert exprs, where
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(where)
    # Both files cover the node's main signals, so a broken extractor cannot pass unseen.
    assert {"grpc_server_handled_total", "tessera_certificate_expiry_timestamp_seconds",
            "tessera_federation_breaker_state", "tessera_ratelimit_backend",
            "tessera_audit_lag_seconds_bucket", "tessera_event_stream_max_lag_events"} <= \
        used.keys()
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, f"not exported by the node: {missing}"


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        # No promtool on this machine (bootstrap installs it where it can): the schema
        # check above is what stands; it runs here as well so this test still checks.
        check_rules_schema(yaml.safe_load(ALERTS.read_text()))
        return
    res = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
